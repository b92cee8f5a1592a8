"""``strategy="auto"``: the documented heuristic, replaced by a measured choice only when it is
clearly slower. Everything ``"auto"`` does is described in one place, the docstring of
:func:`autotune` (``help(gradlab.autotune)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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
# The first call's measurement of the candidates that stop midway stops after this multiple of
# the time of the call's own run.
_BUDGET = 1.5
# A candidate costs Python time of its own before any work (setting up a torch.func transform:
# on the order of 100 us on a CPU). No candidate is started with less than this much budget
# left, so a call shorter than _MIN_SLOT / _BUDGET is not measured at all.
_MIN_SLOT = 200e-6
# The trial of a challenger: at most this many pairs of ordinary calls, one of each strategy.
_TRIAL_PAIRS = 9


class _Trial:
    """A challenger tried against the strategy in place (the baseline) over the next calls of the
    key: they run the two strategies in turn (each call runs one of them, whose result it
    returns: no call is repeated) and the median of the pairs' time ratios decides, over at most
    ``_TRIAL_PAIRS`` pairs; the trial ends after the first pair whose running median says the
    challenger is slower by more than ``MARGIN`` (so a clearly slower challenger costs one call).
    Pairs are back to back and their order alternates, so a drift of the machine's speed cancels
    out of the ratios."""

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

    def undo(self) -> None:
        """Give back the turn just taken (a call whose time is not recorded)."""
        with self.lock:
            self.turn -= 1

    def record(self, name: str, seconds: float) -> float | None:
        """Add one call's time; the median ratio baseline/challenger once the trial is over
        (after ``_TRIAL_PAIRS`` pairs, or sooner when the challenger is clearly slower)."""
        with self.lock:
            self.pending[name] = seconds
            if len(self.pending) == 2:
                h, c = self.pending[self.baseline], self.pending[self.challenger]
                self.ratios.append(h / max(c, 1e-9))
                self.pending.clear()
                median = statistics.median(self.ratios)
                if len(self.ratios) >= _TRIAL_PAIRS or median * MARGIN < 1.0:
                    return median
        return None


@dataclass(frozen=True)
class _Entry:
    heuristic: str
    choice: str | None  # None: not decided yet (measurement off, busy, RNG used, or a trial)
    note: str
    trial: _Trial | None = None
    queue: tuple[str, ...] = ()  # challengers whose trials follow this one


_CACHE: dict[tuple, _Entry] = {}
# Measurements per (operation, function code or object): a function whose key changes on every
# call (it closes over a list it appends to, or is rebuilt around new objects) stops being
# measured after this many signatures, instead of being measured on every call.
_MAX_MEASURED = 16
_MEASURED: dict[tuple, int] = {}
_CACHE_LOCK = threading.Lock()  # writes; reads are single dict look-ups
_MEASURING = threading.Lock()  # one measurement at a time in the process


class _Local(threading.local):
    measuring = False  # this thread is inside a measurement (a class default: no getattr miss)


_LOCAL = _Local()


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
    its heuristic needs), timing that run (``T``). If measurement is on, it then times the
    candidates that run in steps and can be stopped midway (``"loop"`` of ``jacobian`` and
    ``hessian``, nested ``"reverse"`` of ``derivative``), each **once**, under a deadline:

    * a candidate is abandoned, between two of its rows (orders), as soon as it can no longer
      beat ``T`` by ``1.1x``; so it costs at most ``T / 1.1`` plus one row; nested
      ``"reverse"`` (``derivative``), whose orders each cost at least as much as the one before,
      stops before an order as soon as the orders left, at the last one's cost each, cannot end
      in time (at high orders one order costs more than all the earlier ones together: running
      one more only to abandon it after would cost more than the whole measurement so far);
    * nothing starts once ``1.5 T`` has been spent, or with less than 200 microseconds of that
      left (setting up a ``torch.func`` transform alone costs on the order of 100 microseconds
      of Python; so a call shorter than about 130 microseconds runs its heuristic only).

    A candidate that is one vectorised call (``vmap``, ``jvp``: every other strategy) cannot be
    stopped midway, and can be several times slower than the heuristic, so the first call never
    runs it; nor a stepped one with a single step (``derivative`` of order 1).

    **The bound:** a key's first call costs at most ``2.5 T`` plus one row (order) of an abandoned
    candidate, and in every operation of gradlab at most ``2 T`` plus one row, since each has at
    most one candidate that runs in steps (``T`` is a call of the heuristic). The exception is a
    ``jacobian`` whose heuristic turns out to be ``"forward"``: its first call ran ``"reverse"``
    (to learn the output size) and times nothing more: it costs one ``"reverse"`` call, which
    for a Jacobian with many more outputs than inputs can cost several ``"forward"`` calls. A
    call of a function used once costs nothing more. (``jacobian`` does not try the other
    direction at all where the output and input sizes differ by more than 2x: there the
    heuristic's direction is known to win.)

    **The next calls** try the rest, one challenger at a time: a vectorised candidate not timed
    yet, or a stopped-midway one that beat ``T`` by more than ``1.1x`` in the first call (a
    single timing is noisy). The key's next calls run the challenger and the strategy in place in
    turn, each call running **one** strategy and returning its result (the same values: nothing
    is repeated, and no call costs more than one run of the slower of the two), and time them in
    back-to-back pairs whose order alternates (which cancels the machine's drift). After at most
    9 pairs, the challenger replaces the strategy in place if the median time ratio of the
    pairs exceeds ``1.1``; the trial ends after the first pair whose running median shows the
    challenger slower by more than ``1.1x``, so a clearly slower challenger costs one call of
    its own time. A forward-mode challenger's first run on a function also checks that the
    function runs no code with grad mode off (which forward mode would differentiate through),
    which makes that run slower: it is not timed. Then the next challenger's trial starts,
    against the winner. Once no
    challenger is left, every call runs the chosen strategy once. A function whose key changes on
    every call (it closes over a list it appends to) is measured for its first 16 signatures per
    operation, then runs the heuristic.

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
        _changed()


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
        _changed()


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
    return run_keyed(op, problem, validate, fkey, key, cached(key))


# The last key found by cached(), its entry and the cache's version then: a call with the key
# of the call before it (a loop) compares its key to that one instead of hashing it (hashing a
# key costs as much as comparing it, every time: tuples do not keep their hash). _VERSION
# changes (under _CACHE_LOCK) on every write to _CACHE, which makes the memo stale.
_VERSION = 0
_LAST: tuple[int, tuple, _Entry] | None = None


def _changed() -> None:
    """Call under ``_CACHE_LOCK`` after writing to ``_CACHE``."""
    global _VERSION
    _VERSION += 1


def cached(key: tuple) -> _Entry | None:
    """The cached entry of ``key``, or None. Reads take no lock: a dict look-up, or none when
    ``key`` equals the last one found and the cache has not changed since (a write between this
    thread's read of the version and its look-up leaves a memo that is stale from the start)."""
    global _LAST
    version = _VERSION
    last = _LAST
    if last is not None and last[0] == version and last[1] == key:
        return last[2]
    entry = _CACHE.get(key)
    if entry is not None:
        _LAST = (version, key, entry)
    return entry


def steady(entry: _Entry) -> str | None:
    """The strategy a call that found ``entry`` runs as it is, with nothing measured or tried:
    the measured choice, or the heuristic while measurement is off (here, or inside a
    measurement); ``None`` while the key's choice is still open (a trial: :func:`run_keyed`)."""
    return entry.choice if _measuring_on() else entry.heuristic


def _measuring_on() -> bool:
    """Measurement is on here: :func:`is_autotune_enabled`, and not inside a measurement."""
    scoped = _SCOPED.get()  # is_autotune_enabled(), inline: this runs on every call
    return (_ENABLED if scoped is None else scoped) and not _LOCAL.measuring


def run_keyed(
    op: Operation,
    problem: Problem,
    validate: Callable[[], None] | None,
    fkey: Any,
    key: tuple,
    entry: _Entry | None,
) -> Any:
    """:func:`run_auto` once the key (``(op.name, fkey, *problem.key())``) and its cached entry
    (``None`` on a miss) are known: for a caller that built them itself (:func:`gradlab.hvp`)."""
    if entry is None and validate is not None:
        validate()
    if entry is not None:
        chosen = steady(entry)
        if chosen is not None:
            impl = op.direct.get(chosen)  # (the usual hit: run_with_fallback would only call it)
            if impl is not None:
                return impl(problem)
            return op.run_with_fallback(op.auto_safe(chosen), problem, fkey)[1]
    enabled = _measuring_on()
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
        choice, note, trial, queue = _measure(op, problem, heuristic, used, elapsed, devices)
        if not _same(before, _rng_states(devices)):
            choice, note, trial, queue = heuristic, "measured runs drew random numbers", None, ()
    finally:
        _LOCAL.measuring = False
        _MEASURING.release()
    _store(key, _Entry(heuristic, choice, note, trial, queue))
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
) -> tuple[str | None, str, _Trial | None, tuple[str, ...]]:
    """The first call's measurement: ``(choice or None, why, trial or None, queued challengers)``.

    Only the candidates that stop midway (:attr:`Operation.steps`: they check
    :data:`~gradlab._derivatives._registry.DEADLINE` between their rows or orders) are timed
    here, each once, in registry order, under a deadline: the end of the budget (``_BUDGET``
    times the call's own run ``t_ran``), or sooner the time of the fastest so far, past which it
    cannot win and is abandoned. The deadline is never checked from inside a torch function or
    transform (a TorchFunctionMode raising there would skip torch's own clean-up, e.g. the
    restoring of grad mode): only between whole autograd calls, where nothing is half done.

    A candidate that runs as one vectorised call cannot be stopped, so it is not run here: it
    is queued for a :class:`_Trial` over the key's next calls, as is a stopping candidate that
    beat the call's own run by more than ``MARGIN``. With nothing queued the heuristic is the
    choice at once.
    """
    # While other Python threads are alive, forward-mode candidates are neither timed nor
    # chosen: forward-AD levels are process-global in torch, so timing one could break a
    # torch.func.jvp running in another thread (Operation.auto_safe). The heuristic is then
    # represented by its reverse-mode fallback.
    baseline = op.auto_safe(heuristic)
    names = [
        n for n in dict.fromkeys(op.candidate_names(problem)) if n == op.auto_safe(n) != baseline
    ]
    clock = _registry.clock
    end = clock() + _BUDGET * t_ran
    won: dict[str, float] = {}
    stepped = op.stepped(problem)
    for n in names:
        if n not in stepped or n == ran or ran != baseline:
            continue  # (a first run of another strategy than the heuristic: nothing to beat)
        now = clock()
        limit = min(end, now + t_ran / MARGIN)  # slower than this, it cannot win
        if end - now < _MIN_SLOT:
            break  # the budget is spent (or too short to start and abandon a candidate in)
        token = _registry.DEADLINE.set(limit)
        try:
            t = _time_once(functools.partial(op.run, n, problem), devices)
        except _registry.Abandoned:
            continue
        except Exception:  # this strategy cannot handle the function: not a candidate
            continue
        finally:
            _registry.DEADLINE.reset(token)
        if now + t <= limit:
            won[n] = t
    queue = (
        *sorted(won, key=lambda n: won[n]),
        *(n for n in names if n not in stepped),
    )
    if ran != baseline and ran in names and ran not in queue:
        queue = (ran, *queue)  # jacobian: its first run used the other direction
    if not queue:
        return heuristic, "heuristic kept: no candidate within the margin of it", None, ()
    timed = ", ".join(f"{n!r} {t_ran / won[n]:.2f}x faster" for n in won) or "none timed"
    note = f"trial: {queue[0]!r} against {baseline!r} ({timed} in the first call)"
    return None, note, _Trial(baseline, queue[0]), queue[1:]


def _trial_call(op: Operation, problem: Problem, key: tuple, entry: _Entry, fkey: Any) -> Any:
    """One call of a key under trial: runs one of the two strategies, timed (see _Trial)."""
    trial = entry.trial
    assert trial is not None
    name = trial.next()
    if op.auto_safe(name) != name:  # forward mode while other threads are alive: not timed
        return op.run_with_fallback(op.auto_safe(name), problem, fkey)[1]
    if op.probes(name, fkey):  # its first forward-mode run is probed: slower, not timed
        trial.undo()
        used, result = op.run_with_fallback(name, problem, fkey)
        if used != name:
            winner = trial.baseline if name == trial.challenger else trial.challenger
            _next(key, entry, winner, f"trial: {name!r} fell back")
        return result
    devices = problem.devices()
    _sync(devices)
    t0 = _registry.clock()
    used, result = op.run_with_fallback(name, problem, fkey)
    _sync(devices)
    seconds = _registry.clock() - t0
    if used != name:  # one of the two cannot run every input of this key: it is out
        winner = trial.baseline if name == trial.challenger else trial.challenger
        _next(key, entry, winner, f"trial: {name!r} fell back")
        return result
    ratio = trial.record(name, seconds)
    if ratio is not None:
        won = ratio > MARGIN
        verdict = "measured" if won else "kept"
        note = (
            f"{verdict}: {trial.challenger!r} {ratio:.2f}x faster than {trial.baseline!r} "
            f"over {len(trial.ratios)} pairs of calls"
        )
        _next(key, entry, trial.challenger if won else trial.baseline, note)
    return result


def _next(key: tuple, entry: _Entry, winner: str, note: str) -> None:
    """A trial is over: the next queued challenger's trial against ``winner``, or the choice."""
    if entry.queue:
        following = _Trial(winner, entry.queue[0])
        note = f"{note}; trial: {entry.queue[0]!r} against {winner!r}"
        _finish(key, entry, _Entry(entry.heuristic, None, note, following, entry.queue[1:]))
    else:
        _finish(key, entry, _Entry(entry.heuristic, winner, note))


def _finish(key: tuple, old: _Entry, entry: _Entry) -> None:
    """Replace a trial's entry by what follows it (unless the cache was cleared meanwhile, or
    another thread ended the same trial first)."""
    with _CACHE_LOCK:
        current = _CACHE.get(key)
        if current is not None and current.trial is old.trial:
            _CACHE[key] = entry
            _changed()
