"""Time budgets of the benchmark runs (benchmarks/_budget.py): cuts on a busy machine only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks import _budget
from benchmarks._budget import MIN_FRACTION, MIN_ROUNDS, Budget, describe, slowdown
from benchmarks._core import Context, time_interleaved


def test_slowdown_is_running_plus_waiting_over_running():
    assert slowdown((100, 50), (300, 150)) == pytest.approx((200 + 100) / 200)
    assert slowdown((100, 50), (300, 50)) == 1.0  # no waiting: idle
    assert slowdown(None, (1, 1)) is None
    assert slowdown((300, 0), (100, 0)) is None  # a thread ended: no clean difference


def _fake_scheduler(monkeypatch, readings):
    it = iter(readings)
    monkeypatch.setattr(_budget, "scheduler_times", lambda: next(it))


def test_an_idle_machine_cuts_nothing(monkeypatch):
    # ran 1 s, waited 0.05 s: 1.05x, below the floor
    _fake_scheduler(monkeypatch, [(0, 0), *[(10**9, 5 * 10**7)] * 10])
    b = Budget("s", expected=10.0)
    assert b.rounds(5) == 5 and b.run_time(0.2) == 0.2
    assert b.report() == []


def test_a_busy_machine_scales_rounds_and_blocks_by_the_cpu_share(monkeypatch):
    # ran 1 s, waited 1 s: twice as slow as idle
    _fake_scheduler(monkeypatch, [(0, 0), *[(10**9, 10**9)] * 10])
    b = Budget("s", expected=10.0)
    assert b.rounds(6) == 3
    assert b.run_time(0.2) == pytest.approx(0.1)
    assert b.rounds(2) == 2  # never below MIN_ROUNDS
    cuts = {c["what"]: c for c in b.report()}
    assert cuts["rounds"]["planned"] == 6 and cuts["rounds"]["least"] == 3
    assert "2.00x slower" in str(cuts["rounds"]["why"])
    assert "rounds 6 -> 3 (1 times; CPU share" in describe(cuts["rounds"])


def test_past_its_budget_a_suite_measures_the_minimum(monkeypatch):
    _fake_scheduler(monkeypatch, [(0, 0), *[(10**9, 0)] * 10])  # idle, but the suite ran long
    b = Budget("s", expected=10.0)
    b.start -= 16.0  # 16 s into a budget of 15 s
    assert b.over()
    assert b.rounds(9) == MIN_ROUNDS
    assert b.run_time(0.4) == pytest.approx(0.4 * MIN_FRACTION)
    assert "over budget" in str(b.report()[0]["why"])


def test_a_disabled_budget_and_no_budget_measure_as_planned(monkeypatch):
    _fake_scheduler(monkeypatch, [(0, 0), *[(10**9, 10**9)] * 10])
    off = Budget("s", expected=10.0, enabled=False)
    assert off.rounds(6) == 6 and off.run_time(0.2) == 0.2
    ctx = Context(device=torch.device("cpu"), size="quick")  # no budget at all
    assert ctx.planned_rounds(3) == 3 and ctx.planned_run_time() == ctx.min_run_time


def test_time_interleaved_runs_the_cut_number_of_rounds(monkeypatch):
    _fake_scheduler(monkeypatch, [(0, 0), *[(10**9, 2 * 10**9)] * 100])  # 3x slower
    budget = Budget("s", expected=100.0)
    ctx = Context(device=torch.device("cpu"), size="full", budget=budget)  # 9 rounds planned
    timings, _ = time_interleaved({"a": lambda: None, "b": lambda: None}, ctx=ctx, number=1)
    assert timings["a"].blocks == 3  # round(9 / 3)
    assert [c["what"] for c in budget.report()] == ["rounds"]


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or _budget.scheduler_times() is None,
    reason="needs Linux scheduler statistics and CPU affinity",
)
def test_the_cpu_share_is_measured_against_a_real_busy_loop():
    # A subprocess pinned to one CPU with a busy-loop process pinned to the same CPU: it gets
    # about half of that CPU whatever the machine's size, and must see a slowdown well above 1.
    code = textwrap.dedent(
        """
        import os, subprocess, sys, time
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(loop.pid, {cpu})
        try:
            time.sleep(0.2)
            from benchmarks._budget import Budget, probe_slowdown
            b = Budget("s", expected=1.0)
            t = time.perf_counter()
            while time.perf_counter() - t < 1.0:
                pass
            print(b.slowdown(), probe_slowdown(0.5))
        finally:
            loop.kill()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    budget_slowdown, probe = (float(v) for v in out.stdout.split())
    assert budget_slowdown > 1.3 and probe > 1.3
