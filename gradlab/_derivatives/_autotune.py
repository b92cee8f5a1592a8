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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradlab._derivatives._keys import function_key
from gradlab._derivatives._registry import Operation, Problem

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
# factor, in the measurement and again in a re-check.
MARGIN = 1.1
# Candidates whose warm-up call takes longer than this multiple of the best warm-up are not
# timed further: they cannot come within MARGIN.
_PRUNE = 4.0
_ROUNDS = 5
_RECHECK_PAIRS = 9  # the re-check: 9 to 36 back-to-back pairs, about _RECHECK_S of calls
_RECHECK_S = 20e-3
_TARGET_S = 1e-3  # calls per candidate and round: about this many seconds


@dataclass(frozen=True)
class _Entry:
    heuristic: str
    choice: str | None  # None: not measured yet (measurement off, busy or RNG used)
    note: str


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
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled is a {type(enabled).__name__}; pass True or False")
    previous, _ENABLED = _ENABLED, enabled
    return previous


def is_autotune_enabled() -> bool:
    """Whether ``strategy="auto"`` measures here (this thread's ``autotune`` block, else global)."""
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
    its heuristic needs), then, if measurement is on, times every candidate strategy: one warm-up
    call each, candidates more than 4x slower than the fastest warm-up dropped, then 5 interleaved
    rounds of calls (about 1 ms of calls per candidate and round), each candidate's time the minimum
    over its calls (interference only ever adds time). A measured strategy replaces the heuristic
    only if it is more than 1.1x faster, confirmed by a re-check of the two alone (the median time
    ratio over 9 to 36 back-to-back pairs of calls, which cancels the machine's drift); otherwise
    the heuristic stands. So the first call runs ``f`` roughly 10-100 times; later calls run it
    once. A function whose key changes on every call (it closes over a list it appends to) is
    measured for its first 16 signatures per operation, then runs the heuristic.

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
    if not isinstance(enabled, bool):
        raise TypeError(f"autotune: enabled is a {type(enabled).__name__}; pass True or False")
    token = _SCOPED.set(enabled)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def clear_autotune_cache() -> None:
    """Forget every cached ``strategy="auto"`` choice (and heuristic)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _MEASURED.clear()


def autotune_choices() -> dict[tuple, str]:
    """The measured choices: ``(operation, function key, signature...) -> strategy``.

    Keys whose function draws random numbers, or that were only seen with measurement off, are
    not listed (they run the heuristic).
    """
    return {k: e.choice for k, e in list(_CACHE.items()) if e.choice is not None}


def _store(key: tuple, entry: _Entry) -> None:
    with _CACHE_LOCK:
        old = _CACHE.get(key)
        if old is not None and old.choice is not None and entry.choice is None:
            return  # another thread measured meanwhile: keep its choice
        _CACHE[key] = entry
        while len(_CACHE) > _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]  # oldest first


def _sync(devices: Sequence[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _rng_states(devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """The global generators' states (read only: nothing is ever written back)."""
    states = [torch.get_rng_state()]
    for d in devices:
        if d.type == "cuda":
            states.append(torch.cuda.get_rng_state(d))
    return states


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def run_auto(op: Operation, problem: Problem) -> Any:
    """``strategy="auto"`` for ``op`` on ``problem``: see :func:`autotune`'s docstring."""
    fkey = function_key(problem.f)
    key = (op.name, fkey, *problem.key())
    entry = _CACHE.get(key)
    enabled = is_autotune_enabled() and not getattr(_LOCAL, "measuring", False)
    if entry is not None and (entry.choice is not None or not enabled):
        chosen = entry.choice if enabled and entry.choice is not None else entry.heuristic
        return op.run_with_fallback(op.auto_safe(chosen), problem, fkey)[1]
    strategy = op.auto_safe(entry.heuristic if entry is not None else op.first)
    if not enabled:
        used, result = op.run_with_fallback(strategy, problem, fkey)
        heuristic = _heuristic(op, problem, entry, strategy, used, result)
        _store(key, _Entry(heuristic, None, "not measured: autotune off"))
        return result
    devices = problem.devices()
    before = _rng_states(devices)
    _sync(devices)
    t0 = time.perf_counter()
    used, result = op.run_with_fallback(strategy, problem, fkey)
    _sync(devices)
    elapsed = time.perf_counter() - t0
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
        warm = {heuristic: elapsed} if used == heuristic else {}
        choice, note = _measure(op, problem, heuristic, devices, warm)
        if not _same(before, _rng_states(devices)):
            choice, note = heuristic, "measured runs drew random numbers: heuristic kept"
    finally:
        _LOCAL.measuring = False
        _MEASURING.release()
    _store(key, _Entry(heuristic, choice, note))
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


def _time_calls(fn: Callable[[], Any], reps: int, devices: Sequence[torch.device]) -> float:
    best = float("inf")
    for _ in range(reps):
        _sync(devices)
        t0 = time.perf_counter()
        fn()
        _sync(devices)
        best = min(best, time.perf_counter() - t0)
    return best


def _rounds(
    calls: Mapping[str, Callable[[], Any]],
    names: list[str],
    warm: dict[str, float],
    rounds: int,
    devices: Sequence[torch.device],
) -> dict[str, float]:
    """Minimum per-call time of each name over interleaved rounds (the order rotates)."""
    reps = {n: max(1, min(20, int(_TARGET_S / max(warm[n], 1e-7)))) for n in names}
    best = {n: float("inf") for n in names}
    failed: set[str] = set()
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if n in failed:
                continue
            try:
                best[n] = min(best[n], _time_calls(calls[n], reps[n], devices))
            except Exception:  # failed on a later call: never chosen
                failed.add(n)
                best[n] = float("inf")
    return best


def _measure(
    op: Operation,
    problem: Problem,
    heuristic: str,
    devices: Sequence[torch.device],
    warm: dict[str, float],
) -> tuple[str, str]:
    """The strategy to cache, and why: a challenger must beat the heuristic by MARGIN, twice."""
    # While other Python threads are alive, forward-mode candidates are neither timed nor
    # chosen: forward-AD levels are process-global in torch, so timing one could break a
    # torch.func.jvp running in another thread (Operation.auto_safe). The baseline is then the
    # heuristic's reverse-mode fallback.
    heuristic = op.auto_safe(heuristic)
    names = [
        n for n in dict.fromkeys([heuristic, *op.candidate_names(problem)]) if n == op.auto_safe(n)
    ]
    calls = {n: functools.partial(op.run, n, problem) for n in names}
    for n in names:
        if n in warm:
            continue
        try:
            warm[n] = _time_calls(calls[n], 1, devices)
        except Exception:  # this strategy cannot handle the function: not a candidate
            continue
    if heuristic not in warm:
        return heuristic, "heuristic kept: it failed when timed"
    fastest = min(warm.values())
    alive = [n for n in names if n in warm and (warm[n] <= _PRUNE * fastest or n == heuristic)]
    if len(alive) == 1:
        return heuristic, "heuristic kept: the only candidate"
    best = _rounds(calls, alive, warm, _ROUNDS, devices)
    challenger = min(best, key=lambda n: best[n])
    if best[challenger] == float("inf") or best[heuristic] == float("inf"):
        return heuristic, "heuristic kept: candidates failed when timed"
    if challenger == heuristic or best[heuristic] <= MARGIN * best[challenger]:
        return heuristic, "heuristic kept: within the margin of the fastest"
    try:
        ratio = _paired_ratio(calls[heuristic], calls[challenger], warm[challenger], devices)
    except Exception:
        return heuristic, f"heuristic kept: {challenger!r} failed in the re-check"
    if ratio > MARGIN:
        return challenger, f"measured: {ratio:.2f}x faster than the heuristic {heuristic!r}"
    return heuristic, f"heuristic kept: {challenger!r} did not win the re-check ({ratio:.2f}x)"


def _paired_ratio(
    heuristic: Callable[[], Any],
    challenger: Callable[[], Any],
    warm: float,
    devices: Sequence[torch.device],
) -> float:
    """Median over back-to-back pairs of time(heuristic) / time(challenger), order alternating.

    Each pair is measured milliseconds apart, so a slow drift of the machine's speed (other
    processes) cancels out of the ratio, where it would not out of two separate minima.
    """
    pairs = max(_RECHECK_PAIRS, min(4 * _RECHECK_PAIRS, int(_RECHECK_S / max(warm, 1e-7))))
    ratios = []
    for i in range(pairs):
        if i % 2:
            c = _time_calls(challenger, 1, devices)
            h = _time_calls(heuristic, 1, devices)
        else:
            h = _time_calls(heuristic, 1, devices)
            c = _time_calls(challenger, 1, devices)
        ratios.append(h / max(c, 1e-9))
    return statistics.median(ratios)
