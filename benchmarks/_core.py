"""Benchmark machinery: suites, tables, interleaved timing, peak memory, environment records.

A suite is a module in ``benchmarks/suites/`` that defines ``SUITE = Suite(...)``. Its ``run``
function receives a :class:`Context` and returns a list of :class:`Table`. Suites whose code is
not there are simply absent from ``--list``; nothing is faked.

Timing uses :class:`torch.utils.benchmark.Timer` (``blocked_autorange``; it synchronises CUDA).
Variants that are compared are measured *interleaved* in rounds, and each ratio is the median of
the per-round ratios, so slow drifts of the machine cancel out.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import benchmark as tbench
from torch.utils._python_dispatch import TorchDispatchMode

SCHEMA = "gradlab-bench/1"
SIZES = ("quick", "default", "full")


@dataclass
class Context:
    """What a suite gets: device, size preset and a progress callback."""

    device: torch.device
    size: str = "default"
    progress: Callable[[str], None] = lambda msg: None

    def pick(self, quick: Any, default: Any, full: Any) -> Any:
        """Choose a value by the size preset (``--quick`` / default / ``--full``)."""
        return {"quick": quick, "default": default, "full": full}[self.size]

    @property
    def min_run_time(self) -> float:
        """Seconds of ``blocked_autorange`` per variant and round."""
        return self.pick(0.05, 0.2, 0.5)

    @property
    def rounds(self) -> int:
        """Interleaved rounds per comparison."""
        return self.pick(3, 5, 9)


@dataclass
class Table:
    """One result table: rows are dicts; ``columns`` fixes the order shown (first = row key)."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"Table {self.title!r}: unknown columns {sorted(unknown)}")
        self.rows.append(row)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }


@dataclass
class Suite:
    """A named benchmark suite: ``run(ctx) -> list[Table]``."""

    name: str
    description: str
    run: Callable[[Context], list[Table]]
    devices: Sequence[str] = ("cpu", "cuda")


@dataclass
class Timing:
    """Per-call time of one variant over every measured block (seconds)."""

    median: float
    iqr: float
    blocks: int
    times: list[float]

    @classmethod
    def from_times(cls, times: list[float]) -> Timing:
        times = sorted(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        return cls(statistics.median(times), q[2] - q[0], len(times), times)


def _timer(fn: Callable[[], object]) -> tbench.Timer:
    return tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    ctx: Context,
    baseline: str | None = None,
    number: int | None = None,
    rounds: int | None = None,
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time several variants interleaved in rounds; return timings and ratios to ``baseline``.

    Args:
        fns: variant name -> zero-argument callable doing one step.
        ctx: the suite context (rounds, min_run_time, device).
        baseline: the variant the ratios are taken against (default: the first).
        number: if given, each round runs each variant exactly ``number`` times with
            ``Timer.timeit`` instead of ``blocked_autorange`` (for fixed-iteration experiments).
        rounds: number of interleaved rounds (default: ``ctx.rounds``).

    Returns:
        ``(timings, ratios)``: per-call :class:`Timing` per variant, and the median over rounds of
        ``time(variant) / time(baseline)`` per variant.
    """
    names = list(fns)
    baseline = baseline or names[0]
    timers = {n: _timer(f) for n, f in fns.items()}
    for f in fns.values():  # warm-up: first-call latency, allocator, lazy init
        f()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    blocks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds or ctx.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            if number is not None:
                m = timers[n].timeit(number)
            else:
                m = timers[n].blocked_autorange(min_run_time=ctx.min_run_time)
            per_round[n].append(m.median)
            blocks[n].extend(m.times)
    timings = {n: Timing.from_times(blocks[n]) for n in names}
    return timings, _median_ratios(per_round, baseline)


def _median_ratios(per_round: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Per variant, the median over rounds (or turns) of its time over the baseline's."""
    base = per_round[baseline]
    return {n: statistics.median(a / b for a, b in zip(t, base)) for n, t in per_round.items()}


_clock = time.perf_counter  # time_alternating's clock (a test swaps it)


def time_alternating(
    fns: dict[str, Callable[[], object]],
    *,
    ctx: Context,
    baseline: str | None = None,
    rounds: int | None = None,
    block: int = 1,
    skip: int = 0,
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time several variants in short alternating runs; timings and ratios.

    Where :func:`time_interleaved` alternates blocks of about ``ctx.min_run_time`` seconds, this
    alternates runs of ``block`` consecutive calls (default 1: single calls; the order rotated
    every turn), so that a variant and its baseline are measured milliseconds apart: a slow drift
    of the machine's speed (other tenants of a shared machine, frequency changes) cancels out of
    the ratios. The first ``skip`` calls of each run are not recorded: with ``block > skip``
    each variant is measured in its steady state, as in a loop that calls it again and again,
    not right after another variant has changed the caches and the allocator's state. Meant for
    CPU steps of milliseconds; on CUDA it defers to :func:`time_interleaved`, whose blocks
    synchronise once.

    Returns:
        ``(timings, ratios)`` as :func:`time_interleaved`: per-call :class:`Timing` per variant
        (over every recorded call), and the median over turns of the ratio of the variant's
        run (its median call) to the baseline's run in the same turn: runs measured next to
        each other, so that the machine's drift cancels out of each ratio.
    """
    if not 0 <= skip < block:
        raise ValueError(f"time_alternating: need 0 <= skip < block, received {skip=}, {block=}")
    if ctx.device.type != "cpu":
        return time_interleaved(fns, ctx=ctx, baseline=baseline, rounds=rounds)
    names = list(fns)
    baseline = baseline or names[0]
    clock = _clock
    start = clock()
    warm = 0
    while warm < 3 or clock() - start < 0.1:  # warm-up, and an estimate of a call's duration
        for f in fns.values():
            f()
        warm += 1
    per_call = (clock() - start) / (warm * len(names))
    turns = max(5, int(ctx.min_run_time / max(per_call, 1e-9)) // (block - skip))
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_turn: dict[str, list[float]] = {n: [] for n in names}
    for i in range((rounds or ctx.rounds) * turns):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            f = fns[n]
            times = []
            for k in range(block):
                t0 = clock()
                f()
                if k >= skip:
                    times.append(clock() - t0)
            per_turn[n].append(statistics.median(times))
            samples[n].extend(times)
    timings = {n: Timing.from_times(samples[n]) for n in names}
    return timings, _median_ratios(per_turn, baseline)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by ops while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak extra memory of one call of ``fn`` in bytes, and how it was measured.

    On CUDA: ``torch.cuda.max_memory_allocated`` above the level before the call. On CPU: the peak
    of live tensor storage bytes created by ops during the call, tracked with a
    ``TorchDispatchMode`` (exact and repeatable; the process RSS is too coarse because glibc keeps
    freed pages).
    """
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda.max_memory_allocated"
    mode = _LiveTensorBytes()
    with mode:
        fn()
    return mode.peak, "live tensor bytes (TorchDispatchMode)"


def environment(device: torch.device) -> dict[str, Any]:
    """Torch version, device, threads and CPU/GPU model, recorded with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def fmt_time(seconds: float) -> str:
    """Human time: 12.3 us, 4.56 ms, 1.23 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_bytes(n: float) -> str:
    """Human bytes in KiB / MiB."""
    if abs(n) < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.2f} MiB"
