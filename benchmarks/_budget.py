"""Time budgets: a run that finishes on a busy machine, and says what it cut to get there.

On an idle machine every suite runs as planned. On a busy one (other processes competing for the
CPUs, as on a laptop in use), work of a fixed size takes longer, so a suite would run far past its
idle time. Each suite therefore has a budget, :data:`BUDGET_FACTOR` times its typical idle time
(``Suite.seconds``), and the timing functions of :mod:`benchmarks._core` ask its
:class:`Budget` how much of the planned measurement to do:

- **CPU share.** The kernel's scheduler statistics (``/proc/self/task/*/schedstat``) say how long
  this process's threads ran and how long they waited, runnable, for a CPU. Their ratio
  ``(running + waiting) / running`` is how much slower than on an idle machine the process runs:
  1.0 idle, about 2 with two busy-loop processes beside a one-thread run on 2 cores. When it
  exceeds :data:`SLOWDOWN_FLOOR`, rounds and seconds per measured block are scaled by its
  inverse (a fixed-count experiment keeps its count per round), so that the measurement takes
  about its idle wall time.
- **Threads.** OpenMP threads that wait for each other at every parallel region stall when other
  processes hold the CPUs (a thread that is not running holds up the rest: measured, a suite ran
  9-15x slower with 2 threads beside 2 busy loops, 1.5x with one thread). A suite that starts on a
  busy machine (:func:`probe_slowdown` above :data:`THREADS_FLOOR`) runs with one torch thread,
  recorded as a cut like the others.
- **Over budget.** A suite past its budget (slower than the CPU share explains, e.g. OpenMP threads
  spinning against other work) measures the rest at the minimum: :data:`MIN_ROUNDS` rounds,
  :data:`MIN_FRACTION` of the planned seconds per block.

Every cut is recorded (what, from how much to how much, why) in the suite's entry of the results
JSON (``cuts``) and in the markdown report, so that ratios from a cut run are read as such: a cut
gives fewer samples (a wider spread), not a different quantity. Where the scheduler statistics are
unavailable (not Linux), only the over-budget rule applies.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

BUDGET_FACTOR = 1.5  # a suite's budget: this many times its idle seconds
SLOWDOWN_FLOOR = 1.15  # below this CPU-share slowdown nothing is cut (idle-machine jitter)
# A suite starts with one torch thread above this probed slowdown (an idle machine reads 1.00;
# two busy loops beside a run on 2 CPUs read 1.15-1.5 over a 0.25 s probe)
THREADS_FLOOR = 1.05
MIN_ROUNDS = 2  # a ratio needs two rounds for a spread
MIN_FRACTION = 0.25  # the least of the planned seconds per block a cut keeps


def scheduler_times() -> tuple[int, int] | None:
    """Nanoseconds this process's threads have run and waited for a CPU, or ``None``.

    Sums fields 1 and 2 of ``/proc/self/task/<tid>/schedstat`` over the live threads.
    """
    total_run = total_wait = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # the thread ended meanwhile
            continue
        if len(fields) >= 2:
            total_run += int(fields[0])
            total_wait += int(fields[1])
    if total_run == 0:
        return None
    return total_run, total_wait


def probe_slowdown(seconds: float = 0.1) -> float | None:
    """Spin this thread for ``seconds`` and return the :func:`slowdown` it saw (``None``: unknown).

    About 1.0 on an idle machine; about 2 where other processes keep every CPU busy.
    """
    since = scheduler_times()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return slowdown(since, scheduler_times())


def slowdown(since: tuple[int, int] | None, now: tuple[int, int] | None) -> float | None:
    """``(running + waiting) / running`` between two :func:`scheduler_times` readings."""
    if since is None or now is None:
        return None
    run, wait = now[0] - since[0], now[1] - since[1]
    if run <= 0 or wait < 0:  # threads ended between the readings: no clean difference
        return None
    return (run + wait) / run


@dataclass
class Budget:
    """One suite's time budget; the timing functions ask it how much to measure.

    Args:
        suite: the suite's name (for the cut messages).
        expected: its typical idle seconds at this size, or ``None`` (no budget: only the
            CPU-share rule applies).
        factor: the budget is ``factor * expected`` seconds.
        enabled: ``False`` measures everything as planned (the smoke runs of the test suite).
    """

    suite: str
    expected: float | None = None
    factor: float = BUDGET_FACTOR
    enabled: bool = True
    start: float = field(default_factory=time.perf_counter)
    cuts: dict[str, dict[str, object]] = field(default_factory=dict)
    _mark: tuple[int, int] | None = field(default_factory=lambda: scheduler_times())
    _slowdown: float = 1.0

    @property
    def seconds(self) -> float | None:
        """The budget in seconds, ``None`` without an expected time."""
        return None if self.expected is None else self.factor * self.expected

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        """Whether the suite has run past its budget."""
        return self.seconds is not None and self.elapsed() > self.seconds

    def slowdown(self) -> float:
        """How much slower than idle this process has run since the suite began (>= 1)."""
        now = scheduler_times()
        s = slowdown(self._mark, now)
        if s is not None:
            self._slowdown = max(1.0, s)
        return self._slowdown

    def scale(self) -> tuple[float, str | None]:
        """The fraction of the planned measurement to do now, and why (``None``: all of it)."""
        if not self.enabled:
            return 1.0, None
        if self.over():
            return MIN_FRACTION, (
                f"over budget ({self.elapsed():.0f} s > {self.seconds:.0f} s = "
                f"{self.factor:g} x the idle {self.expected:g} s)"
            )
        s = self.slowdown()
        if s > SLOWDOWN_FLOOR:
            return max(MIN_FRACTION, 1.0 / s), f"CPU share: running {s:.2f}x slower than idle"
        return 1.0, None

    def record(self, what: str, planned: float, used: float, why: str) -> None:
        """Record a cut: ``what`` from ``planned`` to ``used`` (kept: the least, and how often)."""
        entry = self.cuts.setdefault(
            what, {"what": what, "planned": planned, "least": used, "times": 0, "why": why}
        )
        entry["times"] = int(entry["times"]) + 1  # type: ignore[call-overload]
        if used < float(entry["least"]):  # type: ignore[arg-type]
            entry["least"], entry["why"] = used, why

    def rounds(self, planned: int) -> int:
        """Interleaved rounds to run instead of ``planned``."""
        frac, why = self.scale()
        if why is None or planned <= MIN_ROUNDS:
            return planned
        used = max(MIN_ROUNDS, round(planned * frac))
        if used < planned:
            self.record("rounds", planned, used, why)
        return used

    def run_time(self, planned: float) -> float:
        """Seconds per measured block instead of ``planned``."""
        frac, why = self.scale()
        if why is None:
            return planned
        self.record("seconds per block", planned, planned * frac, why)
        return planned * frac

    def report(self) -> list[dict[str, object]]:
        """The cuts made, for the results JSON (empty: the suite ran as planned)."""
        return list(self.cuts.values())


def describe(cut: dict[str, object]) -> str:
    """One line for a cut: ``rounds 5 -> 2 (12 times; CPU share: running 1.9x slower)``."""
    return (
        f"{cut['what']} {cut['planned']:g} -> {float(cut['least']):.3g} "  # type: ignore[arg-type]
        f"({cut['times']} times; {cut['why']})"
    )
