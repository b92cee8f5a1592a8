"""``strategy="auto"``: the documented heuristic, replaced by a measured choice only when it is
clearly slower. Everything ``"auto"`` does is described in one place, the docstring of
:func:`autotune` (``help(gradlab.autotune)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradlab._derivatives import _registry
from gradlab._derivatives._keys import function_key
from gradlab._derivatives._registry import Operation, Problem
from gradlab._validate import check_bool

__all__ = [
    "autotune",
    "autotune_choices",
    "clear_autotune_cache",
    "is_autotune_enabled",
    "set_autotune",
]

_ENABLED = os.environ.get("GRADLAB_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")
# Set by ``autotune(...)``: overrides the process-wide setting in its thread/context only.
_SCOPED: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "gradlab_autotune", default=None
)
_CACHE_SIZE = 1024
# A measured strategy replaces the heuristic only when the heuristic is slower by more than this
# factor, in the first call's timing and again over the trial calls that follow.
MARGIN = 1.1
# The first call's measurement stops after this multiple of the time of the call's own run.
_BUDGET = 1.5
# A candidate costs Python time of its own before any work (setting up a torch.func transform:
# on the order of 100 us on a CPU). No candidate is started with less than this much budget
# left, so a call shorter than _MIN_SLOT / _BUDGET is not measured at all.
_MIN_SLOT = 200e-6
# The trial of a challenger: this many pairs of ordinary calls, one of each strategy.
_TRIAL_PAIRS = 9


class _Trial:
    """A challenger that beat the heuristic in the first call's one-shot timing, confirmed (or
    not) over the next ``2 * _TRIAL_PAIRS`` calls of the key: they run the two strategies in
    turn (each call runs one of them, whose result it returns: no call is repeated) and the
    median of the pairs' time ratios decides. Pairs are back to back and their order alternates,
    so a drift of the machine's speed cancels out of the ratios."""

    __slots__ = ("baseline", "challenger", "lock", "pending", "ratios", "turn")

    def __init__(self, baseline: str, challenger: str) -> None:
        self.baseline = baseline
        self.challenger = challenger
        self.lock = threading.Lock()
        self.turn = 0
        self.pending: dict[str, float] = {}
        self.ratios: list[float] = []

    def next(self) -> str:
        """The strategy the next call runs: h c, c h, h c, ... (pairs in alternating order)."""
        with self.lock:
            k, self.turn = self.turn, self.turn + 1
        pair, second = divmod(k, 2)
        order = (self.challenger, self.baseline) if pair % 2 else (self.baseline, self.challenger)
        return order[second]

    def record(self, name: str, seconds: float) -> float | None:
        """Add one call's time; the median ratio heuristic/challenger once the trial is over."""
        with self.lock:
            self.pending[name] = seconds
            if len(self.pending) == 2:
                h, c = self.pending[self.baseline], self.pending[self.challenger]
                self.ratios.append(h / max(c, 1e-9))
                self.pending.clear()
            if len(self.ratios) >= _TRIAL_PAIRS:
                return statistics.median(self.ratios)
        return None


@dataclass(frozen=True)
class _Entry:
    heuristic: str
    choice: str | None  # None: not decided yet (measurement off, busy, RNG used, or a trial)
    note: str
    trial: _Trial | None = None


_CACHE: dict[tuple, _Entry] = {}
# Measurements per (operation, function code or object): a function whose key changes on every
# call (it closes over a list it appends to, or is rebuilt around new objects) stops being
# measured after this many signatures, instead of being measured on every call.
_MAX_MEASURED = 16
_MEASURED: dict[tuple, int] = {}
_CACHE_LOCK = threading.Lock()  # writes; reads are single dict look-ups
_MEASURING = threading.Lock()  # one measurement at a time in the process
_LOCAL = threading.local()  # .measuring: this thread is inside a measurement


def set_autotune(enabled: bool) -> bool:
    """Turn the ``strategy="auto"`` measurement on or off for the whole process.

    Threads and contexts inside a ``with gradlab.autotune(...)`` block keep their own setting.

    Args:
        enabled: ``True`` to measure, ``False`` to use the documented heuristics.

    Returns:
        The previous process-wide setting.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> import gradlab as gl
        >>> previous = gl.set_autotune(False)
        >>> gl.is_autotune_enabled()
        False
        >>> _ = gl.set_autotune(previous)
    """
    global _ENABLED
    check_bool("set_autotune", "enabled", enabled)
    previous, _ENABLED = _ENABLED, enabled
    return previous


def is_autotune_enabled() -> bool:
    """Whether ``strategy="auto"`` measures here (this thread's ``autotune`` block, else global).

    Example:
        >>> import gradlab as gl
        >>> with gl.autotune(False):
        ...     gl.is_autotune_enabled()
        False
        >>> with gl.autotune(True):
        ...     gl.is_autotune_enabled()
        True
    """
    scoped = _SCOPED.get()
    return _ENABLED if scoped is None else scoped


@contextlib.contextmanager
def autotune(enabled: bool) -> Iterator[None]:
    """Context manager: measurement on or off inside the block, in this thread/context only.

    Other threads keep their own setting (a ``contextvars.ContextVar``); after the block the
    previous setting applies again. What ``strategy="auto"`` does, in full:

    **What "auto" returns.** Every strategy of an operation returns the same values and the same
    differentiability (a graph when an input, a tangent or a tensor ``f`` closes over requires grad
    and grad mode is on, as ``torch.func`` does). The choice changes the speed, never the result.

    **The cache.** Choices are cached per function and input signature: the key is the function
    (:mod:`gradlab._derivatives._keys`: code and closed-over values for plain functions and lambdas,
    identity without keeping the object alive for other callables), the inputs' tree structure,
    shapes, dtypes, devices and ``requires_grad``, the options that change the computation and the
    grad mode. A cache hit costs building that key and one dictionary look-up.

    **The first call** of a key runs the function once with the heuristic strategy (which gives the
    result returned; ``jacobian`` runs ``"reverse"`` on a key's first call, to learn the output size
    its heuristic needs), timing that run (``T``). If measurement is on, it then runs each other
    candidate strategy **once**, under a deadline, and never runs anything again for timing:

    * the measurement stops starting candidates once it has spent ``1.5 T``, or when less than
      200 microseconds of that budget is left (setting up a ``torch.func`` transform alone costs
      on the order of 100 microseconds of Python; so a call shorter than about 130 microseconds
      is not measured at all and runs its heuristic);
    * a candidate is abandoned as soon as it is slower than the fastest so far (the heuristic:
      ``1.1x`` the fastest), checked between the rows of the strategies that loop in Python
      (``"loop"``, nested ``"reverse"``), which are the ones that can be tens of times slower; a
      vectorised candidate (one ``vmap``/``jvp`` call) runs to its end and is dropped if late;
    * ``jacobian`` does not time the other direction when the output and input sizes differ by
      more than 2x (there the heuristic's direction is known to win).

    **The bound:** a first call costs at most ``2.5 T`` plus the overrun of one vectorised
    candidate past its deadline (``T`` is a call of the heuristic, except for ``jacobian``, whose
    first call runs ``"reverse"``). Calls too expensive to repeat are thus bounded by their own
    cost: there is no fixed number of repetitions.

    A single timing is noisy, so a challenger that beat the heuristic by more than ``1.1x`` in it
    is not adopted at once: the next 18 calls of the key run the two in turn (each call runs one
    strategy and returns its result: nothing is repeated, and no call is slower than the slower
    of the two) and the challenger replaces the heuristic only if the median time ratio over
    those 9 back-to-back pairs (order alternating, which cancels the machine's drift) exceeds
    ``1.1``; otherwise the heuristic stands. Later calls run the chosen strategy once. A function
    whose key changes on every call (it closes over a list it appends to) is measured for its first
    16 signatures per operation, then runs the heuristic.

    **Random and stateful functions.** The global RNG state (CPU, and CUDA for the devices involved)
    is read, never written, around the single call that produces the result. If it changed, the
    function draws random numbers, its result comes from that one call, and nothing is measured on
    that call (a later call whose run leaves the state unchanged may still be measured, so a
    function drawing random numbers only sometimes can be timed; the timing runs would then advance
    the RNG). No RNG state is ever restored or rewound, so other threads' random streams are
    untouched. A function with other side effects (a counter, BatchNorm running statistics, a
    private ``torch.Generator``, appending to a list) sees them on every timed run: pass an explicit
    ``strategy=`` for it, or turn measurement off.

    **Threads.** The cache is shared by all threads and safe to use from several at once. One key is
    measured by one thread at a time (one measurement runs in the whole process at a time, so that
    timings do not compete with each other); a thread that finds a measurement under way uses the
    heuristic for that call. A function called while its own measurement runs (nested ``"auto"``
    calls inside ``f``) uses the heuristic.

    **Forward mode and other threads.** PyTorch keeps forward-mode AD levels in process-global
    state: a ``torch.func.jvp`` running in one thread fails ("no forward AD level exists") when
    another thread enters or leaves forward mode at the same time, and a lock inside gradlab
    cannot cover a user's own ``jvp``. So while any other Python thread is alive, ``"auto"``
    neither runs nor times a forward-mode strategy (``"forward"``, ``"fwd-rev"``): it runs that
    strategy's reverse-mode fallback (``"reverse"``, ``"rev-rev"``) instead, which gives the same
    values; the cached choice is kept and used again once the thread is alone. When the calling
    thread is the only Python thread, no other thread can start during the call except from
    code the call runs itself, so forward mode is safe there. A strategy named explicitly, and
    :func:`gradlab.jvp`, always run as asked.

    **Turning measurement off:** ``with gradlab.autotune(False):`` for the current thread or
    ``contextvars`` context only; ``gradlab.set_autotune(False)`` for the whole process (returns the
    previous setting); or the environment variable ``GRADLAB_AUTOTUNE=0``, read at import. With
    measurement off, ``"auto"`` uses the heuristic each function documents.
    :func:`clear_autotune_cache` forgets the cached choices and :func:`autotune_choices` shows them.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> import gradlab as gl
        >>> with gl.autotune(False):
        ...     h = gl.hessian(lambda x: (x**3).sum(), torch.ones(2))
        >>> h
        tensor([[6., 0.],
                [0., 6.]])
    """
    check_bool("autotune", "enabled", enabled)
    token = _SCOPED.set(enabled)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def clear_autotune_cache() -> None:
    """Forget every cached ``strategy="auto"`` choice (and heuristic).

    Example:
        >>> import gradlab as gl
        >>> _ = gl.hessian(lambda x: (x**3).sum(), torch.ones(3))
        >>> gl.clear_autotune_cache()
        >>> gl.autotune_choices()
        {}
    """
    with _CACHE_LOCK:
        _CACHE.clear()
        _MEASURED.clear()


def autotune_choices() -> dict[tuple, str]:
    """The measured choices: ``(operation, function key, signature...) -> strategy``.

    Keys whose function draws random numbers, that were only seen with measurement off, or whose
    challenger is still on trial (the next calls after the first, see :func:`autotune`) are not
    listed (they run the heuristic, or the two strategies on trial in turn).

    Example:
        >>> import gradlab as gl
        >>> gl.clear_autotune_cache()
        >>> f = lambda x: (x.sin() ** 3).sum()
        >>> with gl.autotune(False):
        ...     _ = gl.hessian(f, torch.ones(50))
        >>> gl.autotune_choices()  # nothing measured: the heuristic ran
        {}
        >>> with gl.autotune(True):
        ...     for _ in range(20):  # the first call measures, a trial may follow
        ...         _ = gl.hessian(f, torch.ones(50))
        >>> choices = gl.autotune_choices()  # which strategy won depends on the machine
        >>> ops, strategies = {key[0] for key in choices}, set(choices.values())
        >>> ops <= {"hessian"}, strategies <= {"rev-rev", "fwd-rev", "loop"}
        (True, True)
    """
    return {k: e.choice for k, e in list(_CACHE.items()) if e.choice is not None}


def _store(key: tuple, entry: _Entry) -> None:
    with _CACHE_LOCK:
        old = _CACHE.get(key)
        if old is not None and entry.choice is None and entry.trial is None:
            if old.choice is not None or old.trial is not None:
                return  # another thread measured meanwhile: keep its choice or trial
        _CACHE[key] = entry
        while len(_CACHE) > _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]  # oldest first


def _sync(devices: Sequence[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _rng_states(devices: Sequence[torch.device]) -> list[bytes]:
    """The global generators' states as bytes (read only: nothing is ever written back; bytes
    compare in a memcmp, where ``torch.equal`` on the state tensors costs ~20 us a call)."""
    states = [torch.get_rng_state().numpy().tobytes()]
    for d in devices:
        if d.type == "cuda":
            states.append(torch.cuda.get_rng_state(d).numpy().tobytes())
    return states


def _same(a: list[bytes], b: list[bytes]) -> bool:
    return a == b


def run_auto(op: Operation, problem: Problem, validate: Callable[[], None] | None = None) -> Any:
    """``strategy="auto"`` for ``op`` on ``problem``: see :func:`autotune`'s docstring.

    ``validate``: the argument checks that the key implies. An entry is only ever cached after a
    call with its key passed them, and the key holds everything they look at (structure, shapes,
    dtypes, devices), so they run on a cache miss only: a hit skips them.
    """
    fkey = function_key(problem.f)
    key = (op.name, fkey, *problem.key())
    entry = _CACHE.get(key)
    if entry is None and validate is not None:
        validate()
    enabled = is_autotune_enabled() and not getattr(_LOCAL, "measuring", False)
    if entry is not None and (entry.choice is not None or not enabled):
        chosen = entry.choice if enabled and entry.choice is not None else entry.heuristic
        return op.run_with_fallback(op.auto_safe(chosen), problem, fkey)[1]
    if entry is not None and entry.trial is not None:
        return _trial_call(op, problem, key, entry, fkey)
    strategy = op.auto_safe(entry.heuristic if entry is not None else op.first)
    if not enabled:
        used, result = op.run_with_fallback(strategy, problem, fkey)
        heuristic = _heuristic(op, problem, entry, strategy, used, result)
        _store(key, _Entry(heuristic, None, "not measured: autotune off"))
        return result
    devices = problem.devices()
    before = _rng_states(devices)
    _sync(devices)
    t0 = _registry.clock()
    used, result = op.run_with_fallback(strategy, problem, fkey)
    _sync(devices)
    elapsed = _registry.clock() - t0
    heuristic = _heuristic(op, problem, entry, strategy, used, result)
    if not _same(before, _rng_states(devices)):
        _store(key, _Entry(heuristic, None, "not measured: f draws random numbers"))
        return result
    base = (op.name, _base(key[1]))
    if _MEASURED.get(base, 0) >= _MAX_MEASURED:
        _store(key, _Entry(heuristic, heuristic, "not measured: too many signatures of f"))
        return result
    if not _MEASURING.acquire(blocking=False):
        _store(key, _Entry(heuristic, None, "not measured yet: another measurement ran"))
        return result
    _LOCAL.measuring = True
    try:
        choice, note, trial = _measure(op, problem, heuristic, used, elapsed, devices)
        if not _same(before, _rng_states(devices)):
            choice, note, trial = heuristic, "measured runs drew random numbers: kept", None
    finally:
        _LOCAL.measuring = False
        _MEASURING.release()
    _store(key, _Entry(heuristic, choice, note, trial))
    with _CACHE_LOCK:
        _MEASURED[base] = _MEASURED.get(base, 0) + 1
    return result


def _base(fkey: Any) -> Any:
    """The code object (or object identity) at the root of a function key."""
    while isinstance(fkey, tuple) and fkey and fkey[0] in ("code", "partial", "method"):
        fkey = fkey[1]
    return fkey


def _heuristic(
    op: Operation, problem: Problem, entry: _Entry | None, strategy: str, used: str, result: Any
) -> str:
    """The heuristic for a key; a strategy that had to fall back is replaced by its fallback."""
    heuristic = entry.heuristic if entry is not None else op.heuristic(problem, result)
    return used if heuristic == strategy != used else heuristic


def _time_once(fn: Callable[[], Any], devices: Sequence[torch.device]) -> float:
    _sync(devices)
    t0 = _registry.clock()
    fn()
    _sync(devices)
    return _registry.clock() - t0


def _measure(
    op: Operation,
    problem: Problem,
    heuristic: str,
    ran: str,
    t_ran: float,
    devices: Sequence[torch.device],
) -> tuple[str | None, str, _Trial | None]:
    """The first call's measurement: ``(choice or None, why, trial or None)``.

    Each candidate runs once (the one the call already ran is not run again), in registry order,
    under a deadline (:data:`~gradlab._derivatives._registry.DEADLINE`): the end of the budget
    (``_BUDGET`` times the call's own run ``t_ran``), or sooner the time of the fastest so far
    (for the heuristic, ``MARGIN`` times it), past which it cannot win and is abandoned (between
    rows in the strategies that loop in Python; a vectorised candidate runs to its end and is
    dropped when it returns late). The deadline is never checked from inside a torch function
    or transform (a TorchFunctionMode raising there would skip torch's own clean-up, e.g. the
    restoring of grad mode): only between whole autograd calls, where nothing is half done.
    Once the budget is spent nothing more starts. If a challenger beat the heuristic by more than
    ``MARGIN``, a :class:`_Trial` of the two confirms it over the next calls.
    """
    # While other Python threads are alive, forward-mode candidates are neither timed nor
    # chosen: forward-AD levels are process-global in torch, so timing one could break a
    # torch.func.jvp running in another thread (Operation.auto_safe). The heuristic is then
    # represented by its reverse-mode fallback.
    baseline = op.auto_safe(heuristic)
    names = [
        n for n in dict.fromkeys([baseline, *op.candidate_names(problem)]) if n == op.auto_safe(n)
    ]
    times = {ran: t_ran} if ran in names else {}
    clock = _registry.clock
    end = clock() + _BUDGET * t_ran
    for n in names:
        if n in times:
            continue
        now = clock()
        best = min(times.values(), default=math.inf)
        limit = min(end, now + (MARGIN * best if n == baseline else best))
        if end - now < _MIN_SLOT:
            break  # the budget is spent (or too short to start and abandon a candidate in)
        token = _registry.DEADLINE.set(limit)
        try:
            t = _time_once(functools.partial(op.run, n, problem), devices)
        except _registry.Abandoned:
            t = math.inf
        except Exception:  # this strategy cannot handle the function: not a candidate
            continue
        finally:
            _registry.DEADLINE.reset(token)
        if now + t > limit:  # abandoned, or returned past its deadline
            if n != baseline:
                continue
            t = limit - now  # the heuristic's time is at least this
        times[n] = t
    if baseline not in times:
        return heuristic, "heuristic kept: not timed within the budget", None
    challenger = min(times, key=lambda n: times[n])
    ratio = times[baseline] / max(times[challenger], 1e-9)
    if challenger == baseline or ratio <= MARGIN:
        return heuristic, "heuristic kept: within the margin of the fastest", None
    note = f"trial: {challenger!r} {ratio:.2f}x faster than {baseline!r} in one call"
    return None, note, _Trial(baseline, challenger)


def _trial_call(op: Operation, problem: Problem, key: tuple, entry: _Entry, fkey: Any) -> Any:
    """One call of a key under trial: runs one of the two strategies, timed (see _Trial)."""
    trial = entry.trial
    assert trial is not None
    name = trial.next()
    if op.auto_safe(name) != name:  # forward mode while other threads are alive: not timed
        return op.run_with_fallback(op.auto_safe(name), problem, fkey)[1]
    devices = problem.devices()
    _sync(devices)
    t0 = _registry.clock()
    used, result = op.run_with_fallback(name, problem, fkey)
    _sync(devices)
    seconds = _registry.clock() - t0
    if used != name:  # one of the two cannot run every input of this key: the heuristic stays
        _finish(key, _Entry(entry.heuristic, entry.heuristic, f"trial: {name!r} fell back"))
        return result
    ratio = trial.record(name, seconds)
    if ratio is not None:
        won = ratio > MARGIN
        verdict = "measured" if won else "heuristic kept"
        note = f"{verdict}: {trial.challenger!r} {ratio:.2f}x faster than {trial.baseline!r}"
        _finish(key, _Entry(entry.heuristic, trial.challenger if won else entry.heuristic, note))
    return result


def _finish(key: tuple, entry: _Entry) -> None:
    """Replace a trial's entry by its verdict (unless the cache was cleared meanwhile)."""
    with _CACHE_LOCK:
        old = _CACHE.get(key)
        if old is not None and old.trial is not None:
            _CACHE[key] = entry
