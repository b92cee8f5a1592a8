"""The benchmark machinery itself: a tiny suite runs, the JSON has the documented schema, --list,
--suite and compare work. The real suites are not timed here."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import _cli
from benchmarks import _core as core
from benchmarks._core import Context, Suite, Table, peak_memory, time_interleaved

ROOT = Path(__file__).resolve().parents[2]


def _tiny_suite() -> Suite:
    def run(ctx: Context) -> list[Table]:
        x = torch.randn(8, device=ctx.device)
        timings, ratios = time_interleaved(
            {"sum": lambda: x.sum(), "mul": lambda: x * 2}, ctx=ctx, number=5, rounds=2
        )
        t = Table("tiny", ["variant", "median_s", "ratio_vs_sum"])
        for name in timings:
            t.add(variant=name, median_s=timings[name].median, ratio_vs_sum=ratios[name])
        return [t]

    return Suite(name="tiny", description="a tiny test suite", run=run)


@pytest.fixture()
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "discover", lambda: {"tiny": _tiny_suite()})


def test_tiny_suite_writes_documented_schema(tiny: None, tmp_path: Path) -> None:
    assert _cli.main(["--quick", "--suite", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results-cpu.json").read_text())
    assert result["schema"] == "gradlab-bench/1"
    assert result["size"] == "quick"
    for key in ("torch", "device", "threads", "cpu"):
        assert key in result["environment"]
    (table,) = result["suites"]["tiny"]["tables"]
    assert table["columns"] == ["variant", "median_s", "ratio_vs_sum"]
    assert [r["variant"] for r in table["rows"]] == ["sum", "mul"]
    assert table["rows"][0]["ratio_vs_sum"] == 1.0
    assert all(r["median_s"] > 0 for r in table["rows"])
    assert "| variant | median_s | ratio_vs_sum |" in (tmp_path / "results-cpu.md").read_text()
    # the ratios carry their spread, and the load average is recorded
    assert table["rows"][1]["_spread"]["ratio_vs_sum"][0] <= table["rows"][1]["ratio_vs_sum"]
    assert table["keys"] == ["variant"]
    load = result["environment"]["load"]
    assert len(result["environment"]["load_average"]) == 3
    cpus, threads = os.cpu_count(), result["environment"]["threads"]
    assert load["max_1min"] >= 0 and load["threshold"] == min(threads, cpus) + 0.25 * cpus
    assert load["high"] == (load["max_1min"] > load["threshold"])


@pytest.mark.parametrize("kind", ["file in the way", "read-only folder"])
def test_unwritable_out_is_refused_before_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, kind: str
) -> None:
    if kind == "file in the way":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "sub"  # a path below a file: mkdir fails (NotADirectoryError)
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only folder")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "sub"
    ran = []
    tiny = _tiny_suite()

    def spy(ctx: Context) -> list[Table]:
        ran.append(1)
        return tiny.run(ctx)

    monkeypatch.setattr(_cli, "discover", lambda: {"tiny": Suite("tiny", "", run=spy)})
    assert _cli.main(["--quick", "--suite", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write the results there (" in err
    assert "pass a folder you can write to" in err and "Traceback" not in err
    assert ran == []  # refused before any suite ran


def test_unknown_suite_is_refused(tiny: None, tmp_path: Path, capsys) -> None:
    assert _cli.main(["--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "available: ['tiny']" in capsys.readouterr().err


def test_list_names_real_suites() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "grad_vs_backward" in out


def test_compare_two_runs(tiny: None, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli.main(["--quick", "--suite", "tiny", "--out", str(a)]) == 0
    assert _cli.main(["--quick", "--suite", "tiny", "--out", str(b)]) == 0
    capsys.readouterr()
    assert _cli.main(["compare", str(a / "results-cpu.json"), str(b / "results-cpu.json")]) == 0
    out = capsys.readouterr().out
    assert "tiny: tiny (B/A)" in out
    assert "median_s" in out and "sum" in out and "mul" in out


def test_peak_memory_counts_live_tensors() -> None:
    def alloc() -> None:
        a = torch.empty(1024, dtype=torch.float32)  # 4 KiB
        b = torch.empty(2048, dtype=torch.float32)  # 8 KiB, both alive
        del a, b

    peak, method = peak_memory(alloc, torch.device("cpu"))
    assert peak == 12 * 1024
    assert "TorchDispatchMode" in method


def test_plot_writes_a_png(tiny: None, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert _cli.main(["--quick", "--suite", "tiny", "--out", str(tmp_path), "--plot"]) == 0
    png = tmp_path / "results-cpu-tiny.png"  # one figure per suite
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "results-cpu.png").exists()


def test_time_alternating_pairs_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ratios and per-call medians from call-by-call alternation, on a fake clock."""
    now = [0.0]
    monkeypatch.setattr(core, "_clock", lambda: now[0])
    order: list[str] = []

    def step(name: str, dt: float) -> Callable[[], None]:
        def f() -> None:
            order.append(name)
            now[0] += dt

        return f

    fns = {"base": step("base", 1e-3), "slow": step("slow", 3e-3)}
    ctx = core.Context(torch.device("cpu"), size="quick")
    timings, ratios = core.time_alternating(fns, ctx=ctx, baseline="base")
    assert ratios == {"base": 1.0, "slow": pytest.approx(3.0)}
    assert timings["slow"].median == pytest.approx(3e-3)
    assert timings["base"].blocks == timings["slow"].blocks >= 5 * ctx.rounds
    # Alternating: never more than two calls of one variant in a row (where the order rotates).
    assert max(len(list(run)) for _, run in itertools.groupby(order)) <= 2


def test_time_alternating_blocks_skip_the_first_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """With block/skip, each run's first calls (cold after a switch) are not recorded."""
    now = [0.0]
    monkeypatch.setattr(core, "_clock", lambda: now[0])
    order: list[str] = []

    def step(name: str, dt: float) -> Callable[[], None]:
        def f() -> None:
            cold = not order or order[-1] != name
            order.append(name)
            now[0] += dt * (5 if cold else 1)  # the first call after a switch is slow

        return f

    fns = {"base": step("base", 1e-3), "slow": step("slow", 3e-3)}
    ctx = core.Context(torch.device("cpu"), size="quick")
    timings, ratios = core.time_alternating(fns, ctx=ctx, baseline="base", block=4, skip=1)
    assert ratios == {"base": 1.0, "slow": pytest.approx(3.0)}
    assert timings["slow"].median == pytest.approx(3e-3)
    assert timings["slow"].iqr == pytest.approx(0.0)  # no cold call recorded
    runs = [len(list(run)) for _, run in itertools.groupby(order)]
    # warm-up: single calls; then runs of 4, two back to back where the order rotates
    assert set(runs) - {1} <= {4, 8} and len(runs) - runs.count(1) >= 4
    # call by call, the cold first calls are all that is measured
    order.clear()
    timings, _ = core.time_alternating(fns, ctx=ctx, baseline="base")
    assert max(timings["slow"].times) == pytest.approx(15e-3)  # cold calls recorded
    with pytest.raises(ValueError, match="need 0 <= skip < block"):
        core.time_alternating(fns, ctx=ctx, block=2, skip=2)


def test_outside_the_repository_root_says_where_to_run(tmp_path: Path, capsys) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Run it from the repository root" in done.stdout
    assert len(done.stdout.splitlines()) == 1
    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "repository root" in " ".join(help_text.split())


def test_smoke_caps_every_timing() -> None:
    ctx = Context(torch.device("cpu"), size="full", smoke=True)
    assert (ctx.rounds, ctx.min_run_time, ctx.calls(1000)) == (
        core.SMOKE_ROUNDS,
        core.SMOKE_MIN_RUN_TIME,
        core.SMOKE_NUMBER,
    )
    calls = [0]

    def f() -> None:
        calls[0] += 1

    timings, _ = time_interleaved({"f": f}, ctx=ctx, number=1000, rounds=10)
    assert timings["f"].blocks == core.SMOKE_ROUNDS
    # one warm-up call, then per round Timer.timeit's own 2 warm-up calls and the measured ones
    assert calls[0] == 1 + core.SMOKE_ROUNDS * (2 + core.SMOKE_NUMBER)
    # dataclasses.replace (as a suite may do to change the size) keeps the smoke switch
    import dataclasses

    assert dataclasses.replace(ctx, size="quick").smoke


def test_time_alternating_stops_when_the_machine_slows_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Turns are planned from the warm-up; a machine 100x slower afterwards stops them at 4x
    the planned time (2 turns per round at least), instead of running 100x as long."""
    now = [0.0]
    monkeypatch.setattr(core, "_clock", lambda: now[0])
    calls = [0]

    def step(dt: float) -> Callable[[], None]:
        def f() -> None:
            calls[0] += 1
            now[0] += dt * (1 if now[0] < 0.2 else 100)  # slow after the warm-up

        return f

    ctx = core.Context(torch.device("cpu"), size="quick")
    fns = {"base": step(1e-3), "slow": step(2e-3)}
    _, ratios = core.time_alternating(fns, ctx=ctx, baseline="base")
    turns = len(ratios["slow"].samples)  # type: ignore[attr-defined]
    planned = ctx.rounds * max(int(ctx.min_run_time / 1.5e-3), 3)
    assert 2 * ctx.rounds <= turns < planned
    assert ratios["slow"] == pytest.approx(2.0)
