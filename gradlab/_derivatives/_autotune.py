"""``strategy="auto"``: a one-time measurement per function and input signature, then a cache.

Like ``torch.backends.cudnn.benchmark``: the first call of :func:`gradlab.jacobian`,
:func:`gradlab.hessian`, :func:`gradlab.hvp` or :func:`gradlab.derivative` with
``strategy="auto"`` for a given function and input signature (tree structure, shapes, dtypes,
devices of the inputs and of tensors the function closes over, plus the options that change the
computation) times every candidate strategy a few times, interleaved, and caches the fastest. Later
calls with the same signature use the cached choice at the cost of a dictionary look-up.

Measurement calls the function several times. gradlab saves the global RNG state (CPU and CUDA)
before measuring and restores it afterwards, then computes the returned result with one ordinary
call, so a function that draws random numbers sees exactly the RNG stream of a single call. A
function with other side effects (a counter, BatchNorm running statistics, appending to a list)
would see them several times on that first call: turn measurement off for such functions.

Turning measurement off: ``gradlab.set_autotune(False)`` (global, returns the previous setting),
the context manager ``with gradlab.autotune(False): ...``, or the environment variable
``GRADLAB_AUTOTUNE=0`` read at import. With measurement off, ``"auto"`` uses the heuristic each
function documents. :func:`clear_autotune_cache` forgets the cached choices and
:func:`autotune_choices` shows them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "autotune",
    "autotune_choices",
    "clear_autotune_cache",
    "is_autotune_enabled",
    "set_autotune",
]

_ENABLED = os.environ.get("GRADLAB_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")
_CACHE: OrderedDict[tuple, str] = OrderedDict()
_CACHE_SIZE = 1024
# A heuristic choice is kept unless another strategy is faster by more than this factor: ties
# (within the measurement noise) go to the documented heuristic.
_TIE = 1.05
# Candidates whose first (warm-up) call takes longer than this multiple of the best warm-up are
# not timed further: they cannot come within 1.1x.
_PRUNE = 4.0


def set_autotune(enabled: bool) -> bool:
    """Turn the ``strategy="auto"`` measurement on or off globally; return the previous setting.

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
    """Whether ``strategy="auto"`` measures (``True``) or uses the documented heuristics."""
    return _ENABLED


@contextlib.contextmanager
def autotune(enabled: bool) -> Iterator[None]:
    """Context manager: measurement on or off inside the block, the previous setting after it.

    Example:
        >>> import gradlab as gl
        >>> with gl.autotune(False):
        ...     h = gl.hessian(lambda x: (x**3).sum(), torch.ones(2))
        >>> h
        tensor([[6., 0.],
                [0., 6.]])
    """
    previous = set_autotune(enabled)
    try:
        yield
    finally:
        set_autotune(previous)


def clear_autotune_cache() -> None:
    """Forget every measured ``strategy="auto"`` choice."""
    _CACHE.clear()


def autotune_choices() -> dict[tuple, str]:
    """A copy of the cache: ``(kind, function, signature...) -> chosen strategy``."""
    return dict(_CACHE)


def _leaf_sig(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad)
    if isinstance(x, (int, float, bool, str, type(None))):
        return (type(x).__name__, x)
    return type(x).__name__


def signature(tree: Any) -> tuple:
    """Hashable description of a pytree of inputs: its structure and per-leaf shape/dtype/device."""
    if isinstance(tree, torch.Tensor):  # fast paths: the look-up runs on every "auto" call
        return ("tensor", _leaf_sig(tree))
    if isinstance(tree, tuple) and all(isinstance(t, torch.Tensor) for t in tree):
        return ("tuple", tuple(_leaf_sig(t) for t in tree))
    leaves, spec = pytree.tree_flatten(tree)
    return (str(spec), tuple(_leaf_sig(x) for x in leaves))


def function_key(f: Callable[..., Any]) -> Any:
    """What identifies a function for the cache.

    Plain functions and lambdas are keyed by their code object and the signature of the values
    they close over, so a lambda re-created in a loop hits the cache; other callables by identity.
    """
    inner = getattr(f, "__func__", f)  # bound methods
    code = getattr(inner, "__code__", None)
    if code is None:
        partial_func = getattr(f, "func", None)
        if partial_func is not None and callable(partial_func):
            return ("partial", function_key(partial_func), signature(getattr(f, "args", ())))
        return ("object", id(f))
    cells = getattr(inner, "__closure__", None) or ()
    closed = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            value = None
        closed.append(_leaf_sig(value) if not callable(value) else function_key(value))
    return ("code", code, tuple(closed))


def _sync(devices: Sequence[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _rng_state(devices: Sequence[torch.device]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    cuda = {}
    for d in devices:
        if d.type == "cuda":
            index = d.index if d.index is not None else torch.cuda.current_device()
            cuda[index] = torch.cuda.get_rng_state(index)
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, dict[int, torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, s in cuda.items():
        torch.cuda.set_rng_state(s, index)


def _measure(
    candidates: dict[str, Callable[[], Any]],
    devices: Sequence[torch.device],
    prefer: str,
    rounds: int = 5,
    target_s: float = 1e-3,
) -> str:
    """Time every candidate: a warm-up call, then ``rounds`` interleaved rounds of a few calls.

    Each candidate's time is the minimum over its individual calls: interference from other
    processes only ever adds time, so the minimum is the most repeatable statistic.
    """
    warm: dict[str, float] = {}
    errors: list[BaseException] = []
    for name, fn in candidates.items():
        try:
            _sync(devices)
            t0 = time.perf_counter()
            fn()
            _sync(devices)
            warm[name] = time.perf_counter() - t0
        except (ValueError, TypeError):
            raise
        except Exception as exc:  # a strategy that cannot handle this function is skipped
            errors.append(exc)
    if not warm:
        raise errors[0]
    best_warm = min(warm.values())
    alive = [n for n, t in warm.items() if t <= _PRUNE * best_warm or n == prefer]
    reps = {n: max(1, min(20, int(target_s / max(warm[n], 1e-7)))) for n in alive}
    best: dict[str, float] = {n: float("inf") for n in alive}
    for r in range(rounds):
        order = alive[r % len(alive) :] + alive[: r % len(alive)]
        for n in order:
            for _ in range(reps[n]):
                _sync(devices)
                t0 = time.perf_counter()
                candidates[n]()
                _sync(devices)
                best[n] = min(best[n], time.perf_counter() - t0)
    winner = min(best, key=lambda n: best[n])
    if prefer in best and best[prefer] <= _TIE * best[winner]:
        return prefer
    return winner


def choose(
    kind: str,
    f: Callable[..., Any],
    key_extra: tuple,
    candidates: Callable[[], dict[str, Callable[[], Any]]],
    heuristic: str,
    devices: Callable[[], Sequence[torch.device]],
) -> str:
    """The strategy for ``strategy="auto"``: cached, measured, or the heuristic when disabled.

    ``candidates`` (strategy name -> zero-argument call) and ``devices`` are factories called
    only on a cache miss (to synchronise and save the RNG state around the
    measurement), so the cached path stays a dictionary look-up.
    """
    if not _ENABLED:
        return heuristic
    key = (kind, function_key(f), *key_extra)
    try:
        hit = _CACHE.get(key)
    except TypeError:  # unhashable part of the key: do not cache, use the heuristic
        return heuristic
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    options = candidates()
    if len(options) == 1:
        return heuristic
    devs = devices()
    state = _rng_state(devs)
    try:
        winner = _measure(options, devs, heuristic)
    finally:
        _set_rng_state(state)
    _CACHE[key] = winner
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return winner
