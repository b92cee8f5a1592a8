"""Benchmark machinery: suites, tables, interleaved timing, peak memory, environment records.

A suite is a module in ``benchmarks/suites/`` that defines ``SUITE = Suite(...)``. Its ``run``
function receives a :class:`Context` and returns a list of :class:`Table`. Suites whose code is
not there are simply absent from ``--list``; nothing is faked.

Timing uses :class:`torch.utils.benchmark.Timer` (``blocked_autorange``; it synchronises CUDA).
Variants that are compared are measured *interleaved* in rounds, and each ratio is the median of
the per-round ratios, so slow drifts of the machine cancel out. Each ratio is a :class:`Ratio`: a
float that also carries its spread (the interquartile range of the per-round ratios), which
:class:`Table` records beside the value and the report prints as ``1.09x [1.05-1.12]``;
:func:`judge` turns a ratio and a target into "met", "missed" or "inconclusive".

Time budgets: on a busy machine the timing functions measure less (fewer rounds, shorter blocks)
so that a run stays near its idle wall time, and record each cut (:mod:`benchmarks._budget`).

Sizes: ``quick`` / ``default`` / ``full`` choose problem sizes (:meth:`Context.pick`);
``Context.smoke`` (the test suite's setting) keeps the quick sizes but cuts every timing to a
couple of calls, so that every suite runs in seconds: it checks that the suites run, not speed.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import benchmark as tbench
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._budget import Budget

SCHEMA = "gradlab-bench/1"
SIZES = ("quick", "default", "full")

# Smoke setting (Context.smoke): seconds of blocked_autorange per block, rounds, calls per
# fixed-count round. Enough to run every line of a suite; the numbers mean nothing.
SMOKE_MIN_RUN_TIME = 1e-3
SMOKE_ROUNDS = 2
SMOKE_NUMBER = 2


@dataclass
class Context:
    """What a suite gets: device, size preset, a progress callback and the smoke switch.

    ``smoke=True`` (the test suite's setting, never a command-line size) keeps the ``quick``
    sizes but makes every timing in this module as short as it can be (:data:`SMOKE_ROUNDS`
    rounds, :data:`SMOKE_MIN_RUN_TIME` blocks, at most :data:`SMOKE_NUMBER` calls per
    fixed-count round). It survives ``dataclasses.replace(ctx, size=...)``.
    """

    device: torch.device
    size: str = "default"
    progress: Callable[[str], None] = lambda msg: None
    smoke: bool = False
    budget: Budget | None = None  # the suite's time budget (the command line sets one)

    def planned_rounds(self, rounds: int) -> int:
        """``rounds``, cut by the suite's budget on a busy machine."""
        return rounds if self.budget is None else self.budget.rounds(rounds)

    def planned_run_time(self) -> float:
        """:attr:`min_run_time`, cut by the suite's budget on a busy machine."""
        t = self.min_run_time
        return t if self.budget is None else self.budget.run_time(t)

    def pick(self, quick: Any, default: Any, full: Any) -> Any:
        """Choose a value by the size preset (``--quick`` / default / ``--full``)."""
        return {"quick": quick, "default": default, "full": full}[self.size]

    @property
    def min_run_time(self) -> float:
        """Seconds of ``blocked_autorange`` per variant and round."""
        return SMOKE_MIN_RUN_TIME if self.smoke else self.pick(0.05, 0.2, 0.5)

    @property
    def rounds(self) -> int:
        """Interleaved rounds per comparison."""
        return SMOKE_ROUNDS if self.smoke else self.pick(3, 5, 9)

    def calls(self, number: int) -> int:
        """``number`` calls for a fixed-count measurement, or :data:`SMOKE_NUMBER` when smoke."""
        return min(number, SMOKE_NUMBER) if self.smoke else number


def _quartiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


class Ratio(float):
    """A ratio of two times (a ``float``: its median over rounds) that carries its spread.

    ``samples`` are the per-round (or per-turn) ratios measured next to each other; the value is
    their median. ``lo`` and ``hi`` bound the spread: the interquartile range of ``samples``,
    widened where needed to include ``medians_ratio``, the ratio of the two median times a table
    shows beside it (and any ``also`` values: see :meth:`covering`). So a table's ratio column
    and its time columns never tell different stories: where they would, the spread crosses
    both and :func:`judge` says "inconclusive".

    Dividing two ratios with as many samples (ratios to the same baseline, from the same rounds)
    divides round by round: ``ratios["a"] / ratios["b"]`` is the median over rounds of
    ``time(a) / time(b)``, with its spread. ``1 / ratio`` inverts every sample (a speedup).
    Other arithmetic gives a plain ``float``.

    Example:
        >>> r = Ratio([1.0, 1.1, 1.2, 1.3, 1.4])
        >>> float(r), r.lo, r.hi
        (1.2, 1.1, 1.3)
        >>> inv = 1 / r
        >>> round(float(inv), 3), round(inv.lo, 3), round(inv.hi, 3)
        (0.833, 0.769, 0.909)
    """

    samples: tuple[float, ...]
    medians_ratio: float | None
    lo: float
    hi: float

    def __new__(
        cls,
        samples: Sequence[float],
        *,
        medians_ratio: float | None = None,
        also: Sequence[float] = (),
    ) -> Ratio:
        if not samples:
            raise ValueError("Ratio: samples is empty; give at least one per-round ratio")
        self = super().__new__(cls, statistics.median(samples))
        self.samples = tuple(float(x) for x in samples)
        self.medians_ratio = medians_ratio
        lo, hi = _quartiles(sorted(self.samples))
        for x in ([] if medians_ratio is None else [medians_ratio]) + list(also):
            lo, hi = min(lo, x), max(hi, x)
        self.lo, self.hi = lo, hi
        return self

    def covering(self, *values: float) -> Ratio:
        """This ratio with its spread widened to cover ``values`` too (other ratios of the
        times a table shows beside it, e.g. to a baseline row pooled over several runs)."""
        r = Ratio(self.samples, medians_ratio=self.medians_ratio, also=values)
        r.lo, r.hi = min(r.lo, self.lo), max(r.hi, self.hi)
        return r

    def __truediv__(self, other: object) -> Any:
        if isinstance(other, Ratio) and len(other.samples) == len(self.samples):
            mr = None
            if self.medians_ratio is not None and other.medians_ratio is not None:
                mr = self.medians_ratio / other.medians_ratio
            return Ratio([a / b for a, b in zip(self.samples, other.samples)], medians_ratio=mr)
        if isinstance(other, (int, float)) and not isinstance(other, Ratio):
            mr = None if self.medians_ratio is None else self.medians_ratio / other
            return Ratio([a / other for a in self.samples], medians_ratio=mr)
        return float(self) / float(other)  # type: ignore[arg-type]

    def __rtruediv__(self, other: object) -> Any:
        if isinstance(other, (int, float)):
            mr = None if self.medians_ratio is None else other / self.medians_ratio
            return Ratio([other / a for a in self.samples], medians_ratio=mr)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Ratio({float(self):.4g} [{self.lo:.4g}-{self.hi:.4g}], n={len(self.samples)})"

    def __str__(self) -> str:  # str() and f"{r}" print the number, as for a float
        return float.__repr__(self)

    def __reduce__(self) -> Any:  # copy/pickle keep the samples
        return (_make_ratio, (self.samples, self.medians_ratio))


def _make_ratio(samples: Sequence[float], medians_ratio: float | None) -> Ratio:
    return Ratio(samples, medians_ratio=medians_ratio)


def spread(value: float) -> tuple[float, float]:
    """``(lo, hi)`` of a :class:`Ratio`; ``(value, value)`` for a plain number."""
    if isinstance(value, Ratio):
        return value.lo, value.hi
    return float(value), float(value)


def judge(ratio: float, *, at_most: float | None = None, at_least: float | None = None) -> str:
    """Verdict on a target: ``"met"``, ``"missed"`` or ``"inconclusive (spread crosses ...)"``.

    The target is met when the whole spread of ``ratio`` (see :class:`Ratio`) is on the right
    side of it, missed when the whole spread is on the wrong side, and inconclusive otherwise. A
    plain float has no spread. Give exactly one of ``at_most`` (lower is better: a time ratio)
    or ``at_least`` (higher is better: a speedup).

    Example:
        >>> judge(Ratio([1.02, 1.04, 1.05]), at_most=1.10)
        'met (<= 1.10x)'
        >>> judge(Ratio([1.0, 1.08, 1.2]), at_most=1.10)
        'inconclusive: spread 1.04-1.14x crosses the target (<= 1.10x)'
    """
    if (at_most is None) == (at_least is None):
        raise ValueError(
            f"judge: give exactly one of at_most or at_least, received {at_most=}, {at_least=}"
        )
    lo, hi = spread(ratio)
    if at_most is not None:
        target, ok, bad = f"<= {at_most:.2f}x", hi <= at_most, lo > at_most
    else:
        assert at_least is not None
        target, ok, bad = f">= {at_least:.2f}x", lo >= at_least, hi < at_least
    if ok:
        return f"met ({target})"
    if bad:
        return f"missed ({target})"
    return f"inconclusive: spread {lo:.2f}-{hi:.2f}x crosses the target ({target})"


RATIO_NOTE = (
    "x.xx [lo-hi]: the median of the per-round ratios (each ratio is defined above) and their "
    "interquartile range, widened where needed to include the ratio of the median times shown, "
    "so that ratios and times never disagree; a target is met or missed only when the whole "
    "range is on one side of it, else inconclusive."
)


def is_ratio_column(column: str) -> bool:
    """Column-name convention for ratios: contains ``ratio`` or ends in ``_x``."""
    return "ratio" in column or column.endswith("_x")


def higher_is_better(column: str) -> bool:
    """Column-name convention: a ``speedup`` ratio is better higher, every other ratio lower."""
    return "speedup" in column


@dataclass
class Table:
    """One result table: rows are dicts; ``columns`` fixes the order shown.

    ``keys`` names the columns that identify a row (case and variant), which ``compare`` matches
    on; by default the shortest run of leading non-measurement columns that tells the rows
    apart (see :func:`key_columns`). A :class:`Ratio` cell is stored as its float value, its
    spread in the row's ``"_spread"`` dict (``{column: [lo, hi]}``), and the table's notes get
    :data:`RATIO_NOTE` once.
    """

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: list[str] | None = None

    def add(self, **row: Any) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"Table {self.title!r}: unknown columns {sorted(unknown)}")
        spreads = {c: [v.lo, v.hi] for c, v in row.items() if isinstance(v, Ratio)}
        row = {c: float(v) if isinstance(v, Ratio) else v for c, v in row.items()}
        if spreads:
            row["_spread"] = spreads
        self.rows.append(row)

    def to_json(self) -> dict[str, Any]:
        notes = list(self.notes)
        if any("_spread" in r for r in self.rows) and RATIO_NOTE not in notes:
            notes.append(RATIO_NOTE)
        return {
            "title": self.title,
            "columns": self.columns,
            "keys": key_columns(self.columns, self.rows, self.keys),
            "rows": self.rows,
            "notes": notes,
        }


def is_measurement(column: str) -> bool:
    """Column-name convention for measured values: ``*_s``, ``*_bytes``, ratios."""
    return column.endswith(("_s", "_bytes")) or is_ratio_column(column)


def key_columns(
    columns: Sequence[str], rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None
) -> list[str]:
    """The columns that identify a row: ``keys`` if given, else inferred.

    Inferred: the shortest run of leading non-measurement columns (see :func:`is_measurement`)
    whose values tell every row apart; all of the leading non-measurement columns if none does.
    """
    if keys is not None:
        return list(keys)
    lead: list[str] = []
    for c in columns:
        if is_measurement(c):
            break
        lead.append(c)
    lead = lead or list(columns[:1])
    for n in range(1, len(lead) + 1):
        seen = {tuple(str(r.get(c)) for c in lead[:n]) for r in rows}
        if len(seen) == len(rows):
            return lead[:n]
    return lead


@dataclass
class Suite:
    """A named benchmark suite: ``run(ctx) -> list[Table]``.

    ``seconds`` (optional): the suite's typical wall time per size (``"quick"``, ``"default"``,
    ``"full"``) on an idle 2-core CPU machine. It sets the suite's time budget
    (:data:`benchmarks._budget.BUDGET_FACTOR` times it: past that, measurements are cut to the
    minimum) and the ETA of a first run (later runs use the previous run's own times). Give it
    for every size measured idle; a size without it has no budget (only the CPU-share cuts).
    """

    name: str
    description: str
    run: Callable[[Context], list[Table]]
    devices: Sequence[str] = ("cpu", "cuda")
    seconds: Mapping[str, float] = field(default_factory=dict)
    #: The suite times code that behaves differently while other Python threads are alive
    #: (gradlab's ``strategy="auto"`` runs no forward mode then): the run's heartbeat thread is
    #: paused for it, so that it measures a single-threaded program, as most users run.
    single_threaded: bool = False


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
        ``(timings, ratios)``: per-call :class:`Timing` per variant, and per variant the median
        over rounds of ``time(variant) / time(baseline)``, a :class:`Ratio` carrying the
        per-round ratios (its spread includes ``timings[variant].median /
        timings[baseline].median``).
    """
    names = list(fns)
    baseline = baseline or names[0]
    if number is not None:  # a fixed-count experiment keeps its count; a busy machine cuts rounds
        number = ctx.calls(number)
    rounds = ctx.planned_rounds(rounds or ctx.rounds)
    if ctx.smoke:
        rounds = min(rounds, SMOKE_ROUNDS)
    timers = {n: _timer(f) for n, f in fns.items()}
    for f in fns.values():  # warm-up: first-call latency, allocator, lazy init
        f()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    blocks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        # asked each round: a busy machine cuts the rest (fixed-count rounds keep their count)
        run_time = ctx.planned_run_time() if number is None else 0.0
        for n in order:
            if number is not None:
                m = timers[n].timeit(number)
            else:
                m = timers[n].blocked_autorange(min_run_time=run_time)
            per_round[n].append(m.median)
            blocks[n].extend(m.times)
    timings = {n: Timing.from_times(blocks[n]) for n in names}
    return timings, _median_ratios(per_round, baseline, timings)


def _median_ratios(
    per_round: dict[str, list[float]], baseline: str, timings: dict[str, Timing]
) -> dict[str, float]:
    """Per variant, the median over rounds (or turns) of its time over the baseline's."""
    base = per_round[baseline]
    bmed = timings[baseline].median
    return {
        n: Ratio(
            [a / b for a, b in zip(t, base)],
            medians_ratio=timings[n].median / bmed if bmed > 0 else None,
        )
        for n, t in per_round.items()
    }


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
    alternates runs of ``block`` consecutive calls (default 1: single calls; a new seeded
    random order every turn; about ``ctx.min_run_time`` of recorded calls per variant and round,
    at least 3 / 2 / 5 turns per round at the quick / default / full sizes), so that a variant
    and its baseline are measured milliseconds apart: a slow drift of the machine's speed (other
    tenants of a shared machine, frequency changes) cancels out of the ratios. The first
    ``skip`` calls of each run are not recorded: with ``block > skip`` each variant is measured
    in its steady state, as in a loop that calls it again and again, not right after another
    variant has changed the caches and the allocator's state. Meant for CPU steps of
    milliseconds; on CUDA it defers to :func:`time_interleaved`, whose blocks synchronise once.
    If the machine slows down after the warm-up, the turns stop at 4 times the planned time (at
    least 2 s and 2 turns per round).

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
        if ctx.smoke:
            break
    per_call = (clock() - start) / (warm * len(names))
    rounds = ctx.planned_rounds(rounds or ctx.rounds)
    # About ctx.min_run_time of recorded calls per variant and round, and at least
    # ctx.pick(3, 2, 5) turns per round: slow steps (tens of ms) are not run for minutes.
    per_round = int(ctx.planned_run_time() / max(per_call, 1e-9)) // (block - skip)
    n_turns = rounds * max(per_round, ctx.pick(3, 2, 5))
    if ctx.smoke:  # a couple of turns, one recorded call per run
        n_turns, block = SMOKE_ROUNDS, skip + 1
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_turn: dict[str, list[float]] = {n: [] for n in names}
    # On a machine that slows down after the warm-up (other work), stop at 4x the planned time
    # (at least 2 s), after at least 2 turns per round: fewer turns, the same measurement.
    deadline = clock() + max(2.0, 4 * n_turns * len(names) * block * per_call)
    # A new order every turn (seeded: runs are repeatable): with a fixed cyclic order (rotated)
    # each variant always follows the same one, and the one after a slow, allocation-heavy
    # variant read up to 1.13x slower than the same code elsewhere in the order (measured: auto
    # and heuristic, identical code there, in the derivatives suite).
    shuffle = random.Random(0)
    for i in range(n_turns):
        if i >= 2 * rounds and clock() > deadline:
            break
        order = names[:]
        shuffle.shuffle(order)
        for n in order:
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
    return timings, _median_ratios(per_turn, baseline, timings)


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


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), ``None`` where unsupported."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Torch version, device, threads, CPU/GPU model and load average, recorded with every result.

    ``load_average`` is the 1/5/15-minute load at the start; the command line adds the highest
    1-minute load seen during the run and a warning when it was high (see ``_cli``).
    """
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
        "load_average": load_average(),
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
