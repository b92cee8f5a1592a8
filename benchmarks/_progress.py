"""Progress of a benchmark run: status lines with elapsed time and ETA, a heartbeat, the load.

Every line goes to stderr as ``[suite 2/5 | 41s elapsed | ETA 1m50s] message``. A background
thread repeats the last message (``... still running, 12s``) whenever no line was printed for
:data:`HEARTBEAT_S` seconds, so a long measurement never looks like a hang, and samples the
load average each time, so that the run can say afterwards whether the machine was busy.

The ETA adds, for the suite running now, what is left of its expected duration, and for every
suite still to come, its expected duration. Expected durations come from the previous run's
results JSON of the same size and device in the output folder (each suite records its
``seconds``), else from the suite's own ``Suite.seconds`` (typical idle times); a suite with
neither counts as unknown, and the ETA then says ``+?``. On a busy machine the budget cuts each
suite's timing loops by its CPU share, so the expected (idle) durations stay the estimate (beside
two busy loops on 2 CPUs the default run took 0.93x its idle time, while the estimate stretched
by the slowdown had started at 16 minutes for a 9.5-minute run); with the budget off
(``--no-budget``) they are stretched by how much slower than idle the run is going
(:meth:`benchmarks._budget.Budget.slowdown`, capped at the budget factor). A suite running
past its estimate counts at most up to its budget.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TextIO

from benchmarks._budget import BUDGET_FACTOR, Budget
from benchmarks._core import load_average

HEARTBEAT_S = 10.0


def fmt_duration(seconds: float) -> str:
    """``42s``, ``3m05s``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Status lines for a run of ``suites``; call it with a message, ``begin`` each suite.

    Args:
        suites: the names of the suites to run, in order.
        expected: expected seconds per suite name (missing: unknown).
        heartbeat: seconds without a line after which the last message is repeated (0: never).
        stream: where lines go (default ``sys.stderr``).
    """

    def __init__(
        self,
        suites: Sequence[str] = (),
        *,
        expected: Mapping[str, float] | None = None,
        heartbeat: float = HEARTBEAT_S,
        stream: TextIO | None = None,
    ) -> None:
        self.suites = list(suites)
        self.expected = dict(expected or {})
        self.index = 0
        self.suite = ""
        self.start = time.perf_counter()
        self.suite_start = self.start
        self.stream = stream
        self.max_load: float | None = None
        self.budget: Budget | None = None  # the running suite's budget (set by the command line)
        self._last_msg = "starting"
        self._last_msg_at = self.start
        self._last_line = self.start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = heartbeat
        self._sample_load()
        self._start_beat()

    def _start_beat(self) -> None:
        if self._heartbeat > 0:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._beat,
                args=(self._heartbeat, self._stop),
                name="bench-heartbeat",
                daemon=True,
            )
            self._thread.start()

    @contextlib.contextmanager
    def without_heartbeat(self) -> Iterator[None]:
        """No heartbeat thread inside (a suite that needs the process single-threaded: see
        :attr:`benchmarks._core.Suite.single_threaded`); progress lines still print."""
        running = self._thread is not None
        if running:
            self._stop.set()
            self._thread.join()  # type: ignore[union-attr]
            self._thread = None
        try:
            yield
        finally:
            if running:
                self._start_beat()

    @property
    def total(self) -> int:
        return len(self.suites)

    def begin(self, suite: str) -> None:
        """A suite starts."""
        with self._lock:
            self.index += 1
            self.suite = suite
            self.suite_start = time.perf_counter()
        self(f"starting {suite}")

    def eta(self) -> str:
        """Seconds left, as text: ``1m50s``, ``1m50s+?`` (some suite unknown), ``?``."""
        now = time.perf_counter()
        budget = self.budget
        # an enabled budget cuts the timing loops by the CPU share: the idle times stand
        stretch = 1.0 if budget is None or budget.enabled else min(budget.slowdown(), BUDGET_FACTOR)
        left, unknown = 0.0, False
        for i, name in enumerate(self.suites):
            if i + 1 < self.index:
                continue
            if name not in self.expected:
                unknown = True
                continue
            if i + 1 == self.index:
                elapsed = now - self.suite_start
                here = stretch * self.expected[name] - elapsed
                if here <= 0 and budget is not None and budget.seconds is not None:
                    here = budget.seconds - elapsed  # running long: at most its budget
                left += max(0.0, here)
            else:
                left += stretch * self.expected[name]
        if unknown and left == 0:
            return "?"
        return fmt_duration(left) + ("+?" if unknown else "")

    def __call__(self, msg: str) -> None:
        with self._lock:
            self._last_msg, self._last_msg_at = msg, time.perf_counter()
        self._emit(msg)

    def _emit(self, msg: str) -> None:
        eta = self.eta()
        now = time.perf_counter()
        head = f"[{self.suite or '-'} {self.index}/{self.total}"
        head += f" | {fmt_duration(now - self.start)} elapsed | ETA {eta}]"
        with self._lock:
            print(f"{head} {msg}", file=self.stream or sys.stderr, flush=True)
            self._last_line = now

    def _sample_load(self) -> None:
        load = load_average()
        if load is not None:
            self.max_load = load[0] if self.max_load is None else max(self.max_load, load[0])

    def _beat(self, every: float, stop: threading.Event) -> None:
        while True:
            with self._lock:
                wait = every - (time.perf_counter() - self._last_line)
            if wait > 0:
                if stop.wait(wait):
                    return
                continue
            if stop.is_set():
                return
            self._sample_load()
            with self._lock:
                msg, since = self._last_msg, time.perf_counter() - self._last_msg_at
            self._emit(f"{msg} ... still running ({fmt_duration(since)} on this step)")

    def close(self) -> None:
        """Stop the heartbeat thread and take a last load sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_load()
