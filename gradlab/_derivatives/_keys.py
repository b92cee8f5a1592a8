"""Cache keys for ``strategy="auto"``: what identifies a function and an input signature.

A key must be hashable, cheap (it is computed on every ``"auto"`` call), must never recurse
without bound, and must never let a new object inherit the cached choice of a dead one that
happened to live at the same address.

* Plain functions and lambdas: their code object, the keys of the values they close over and of
  their default arguments, so that a lambda re-created in a loop hits the cache. A function that
  closes over itself (a recursive inner function) is keyed once; the revisit is a marker.
* ``functools.partial``: the key of its function and of its bound arguments.
* Bound methods: the key of the function and the identity of ``__self__``.
* Every other callable (modules, objects with ``__call__``, builtins): its identity, held through
  a weak reference (a strong one where the object cannot be weakly referenced, which keeps it
  alive and so its address unique).

Closed-over tensors contribute their shape, dtype, device and ``requires_grad``, not their values.

A plain function's key is remembered (per function object, dropped when it dies) together with
the objects it closed over and its defaults; a call of the same function with the same objects
gets the remembered key after identity checks, without walking the closure (a cache hit of
``"auto"`` costs well under a microsecond for the key). So a closed-over object changed in place
(a list appended to, a tensor's ``requires_grad_()``) keeps the key it had; a cell rebound to
another object gives a new key. A key only selects a cached strategy, and every strategy returns
the same result, so a stale key can cost speed, never change a result.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["function_key", "leaf_signature", "signature"]

# Nesting depth (closures of closures, containers in containers) beyond which a value is keyed
# by identity: bounds the cost of a key and ends any cycle.
_MAX_DEPTH = 6
# Containers longer than this are keyed by type and length only.
_MAX_ITEMS = 32


class _Ref:
    """Identity of an object, without keeping it alive when it can be weakly referenced.

    Two ``_Ref`` are equal while both objects are alive and are the same object; a ``_Ref`` whose
    object has died equals no other ``_Ref``, so a new object at the old address is a new key.
    """

    __slots__ = ("_hash", "_ref", "_strong")

    def __init__(self, obj: Any) -> None:
        self._hash = id(obj)
        try:
            self._ref: weakref.ref | None = weakref.ref(obj)
            self._strong = None
        except TypeError:  # builtins, ints, ...: a strong reference keeps the address unique
            self._ref = None
            self._strong = obj

    def get(self) -> Any:
        return self._strong if self._ref is None else self._ref()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ref):
            return NotImplemented
        mine = self.get()
        return mine is not None and mine is other.get()

    def __repr__(self) -> str:
        obj = self.get()
        return f"<{type(obj).__name__} object>" if obj is not None else "<dead object>"


_Tensor = torch.Tensor
_SCALARS = (int, float, bool, str, type(None))


def leaf_signature(x: Any) -> Any:
    """Hashable description of one leaf: a tensor's shape, dtype, device and ``requires_grad``."""
    if isinstance(x, _Tensor):
        return (x.shape, x.dtype, x.device, x.requires_grad)  # torch.Size is a hashable tuple
    if isinstance(x, float):
        return ("float", repr(x))  # repr: a NaN key must equal itself
    if isinstance(x, _SCALARS):
        return (type(x).__name__, x)
    return type(x).__name__


class _NotPlain(Exception):
    """A pytree node other than a tensor, a plain tuple/list or a dict: keyed through pytree."""


def _plain(tree: Any, depth: int) -> Any:
    """Key of a pytree of tensors in plain tuples, lists and dicts (no pytree flatten, no spec)."""
    if isinstance(tree, _Tensor):
        return (tree.shape, tree.dtype, tree.device, tree.requires_grad)
    kind = type(tree)
    if depth < 8:
        if kind is tuple or kind is list:
            return (kind.__name__, tuple([_plain(x, depth + 1) for x in tree]))
        if kind is dict:
            return ("dict", tuple([(k, _plain(v, depth + 1)) for k, v in tree.items()]))
    raise _NotPlain


def signature(tree: Any) -> tuple:
    """Hashable description of a pytree of inputs: its structure and per-leaf shape/dtype/device.

    Tensors in plain tuples, lists and dicts (the usual arguments, and a model's parameter dict)
    are keyed directly, a few hundred nanoseconds per leaf; anything else (named tuples,
    registered pytree nodes, non-tensor leaves) through ``pytree.tree_flatten`` and its spec.
    """
    if isinstance(tree, _Tensor):  # fast paths: the look-up runs on every "auto" call
        return ("tensor", (tree.shape, tree.dtype, tree.device, tree.requires_grad))
    if type(tree) is tuple and len(tree) == 1 and isinstance(tree[0], _Tensor):
        t = tree[0]
        return ("tuple", ((t.shape, t.dtype, t.device, t.requires_grad),))
    try:
        return ("plain", _plain(tree, 0))
    except _NotPlain:
        leaves, spec = pytree.tree_flatten(tree)
        return (str(spec), tuple(leaf_signature(x) for x in leaves))


def _value_key(v: Any, seen: set[int], depth: int) -> Any:
    if isinstance(v, _Tensor):
        return (v.shape, v.dtype, v.device, v.requires_grad)
    if isinstance(v, _SCALARS):
        return leaf_signature(v)
    if depth >= _MAX_DEPTH:
        return _Ref(v)
    if callable(v):
        return _function_key(v, seen, depth + 1)
    if isinstance(v, (tuple, list)):
        if len(v) > _MAX_ITEMS:
            return (type(v).__name__, len(v))
        return (type(v).__name__, tuple([_value_key(x, seen, depth + 1) for x in v]))
    if isinstance(v, dict):
        if len(v) > _MAX_ITEMS:
            return ("dict", len(v))
        return (
            "dict",
            tuple(
                (_value_key(k, seen, depth + 1), _value_key(x, seen, depth + 1))
                for k, x in v.items()
            ),
        )
    return _Ref(v)


def _function_key(f: Callable[..., Any], seen: set[int], depth: int) -> Any:
    if type(f) is types.FunctionType:
        closure, defaults, kwdefaults = f.__closure__, f.__defaults__, f.__kwdefaults__
        if closure is None and defaults is None and kwdefaults is None:
            return ("code", f.__code__)
        if id(f) in seen:  # a function reached again (recursion): the marker ends the walk
            return ("recursive", f.__code__)
        seen.add(id(f))
        cells = []
        for cell in closure or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the function)
                cells.append("<empty>")
                continue
            cells.append(_value_key(value, seen, depth))
        return (
            "code",
            f.__code__,
            tuple(cells),
            None if defaults is None else _value_key(defaults, seen, depth),
            None if kwdefaults is None else _value_key(kwdefaults, seen, depth),
        )
    if isinstance(f, functools.partial):
        kw = tuple((k, _value_key(x, seen, depth + 1)) for k, x in f.keywords.items())
        return ("partial", _value_key(f.func, seen, depth), _value_key(f.args, seen, depth), kw)
    if isinstance(f, types.MethodType):
        return ("method", _value_key(f.__func__, seen, depth), _Ref(f.__self__))
    return _Ref(f)


# id(plain function) -> (weak reference to it, its defaults, kwdefaults and closed-over objects
# when its key was made, the key): the same function called again with the same closed-over
# objects reuses its key after identity checks, without walking its closure again.
_MEMO: dict[int, tuple] = {}
_MEMO_SIZE = 1024
_EMPTY = object()  # stands in for an empty closure cell


def _contents(closure: tuple | None) -> tuple:
    if not closure:
        return ()
    out = []
    for cell in closure:
        try:
            out.append(cell.cell_contents)
        except ValueError:
            out.append(_EMPTY)
    return tuple(out)


def _same_contents(closure: tuple | None, contents: tuple) -> bool:
    # walks the cells itself instead of comparing _contents(closure): building that tuple on
    # every "auto" call made the key 2.5x slower (0.28 -> 0.70 us) and showed in the suite
    if not closure:
        return not contents
    for cell, value in zip(closure, contents):
        try:
            if cell.cell_contents is not value:
                return False
        except ValueError:
            if value is not _EMPTY:
                return False
    return True


def function_key(f: Callable[..., Any]) -> Any:
    """What identifies ``f`` for the ``"auto"`` cache (see the module docstring). Hashable.

    A plain function seen before, whose defaults and closed-over objects are the same objects as
    then, gets its previous key back (so a closed-over tensor changed in place, e.g. by
    ``requires_grad_()``, keeps the key it had: a cached choice is about speed only).
    """
    if type(f) is not types.FunctionType:
        return _function_key(f, set(), 0)
    memo = _MEMO.get(id(f))
    if (
        memo is not None
        and memo[0]() is f
        and memo[1] is f.__defaults__
        and memo[2] is f.__kwdefaults__
        and _same_contents(f.__closure__, memo[3])
    ):
        return memo[4]
    key = _function_key(f, set(), 0)
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
    ident = id(f)

    def forget(_: object) -> None:
        _MEMO.pop(ident, None)

    _MEMO[ident] = (
        weakref.ref(f, forget),
        f.__defaults__,
        f.__kwdefaults__,
        _contents(f.__closure__),
        key,
    )
    return key
