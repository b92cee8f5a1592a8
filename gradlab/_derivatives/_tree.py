"""Flatten and rebuild the argument trees of the derivative functions, fast for plain containers.

The arguments are almost always a tensor, a tuple of tensors or a model's parameter dict, and
these helpers run on every call: ``torch.utils._pytree`` costs tens of microseconds per call on
a parameter dict (spec objects, registry look-ups). :func:`flatten` walks tensors, tuples, lists
and dicts directly (the same leaf order as ``pytree``: insertion order for dicts) and hands any
other node to ``pytree``; its spec is a plain tuple, so two specs compare with ``==`` and hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["flatten", "flatten_one", "unflatten", "unflatten_one"]

_LEAF = "leaf"
_LEAVES = [(_LEAF,) * n for n in range(64)]  # the specs of the children of all-tensor containers
_Tensor = torch.Tensor


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """``(leaves, spec)``; :func:`unflatten` ``(leaves, spec)`` rebuilds the tree."""
    if type(tree) is tuple and len(tree) == 1:  # f's arguments, a single one: (x,)
        return flatten_one(tree[0])
    leaves: list[Any] = []
    return leaves, _walk(tree, leaves)


_ONE_LEAF = (tuple, 1, (_LEAF,))  # the spec of (x,), x a tensor


def flatten_one(tree: Any) -> tuple[list[Any], Any]:
    """``flatten((tree,))``, without making the tuple: f's arguments when it takes one (a tensor
    inline; anything else, a parameter dict included, by :func:`_walk`)."""
    if isinstance(tree, _Tensor):
        return [tree], _ONE_LEAF
    leaves: list[Any] = []
    return leaves, (tuple, 1, (_walk(tree, leaves),))


def _same(n: int) -> tuple:
    """The children's specs of an all-tensor container of ``n``."""
    return _LEAVES[n] if n < 64 else (_LEAF,) * n


def unflatten_one(leaves: Sequence[Any], spec: Any) -> Any:
    """``unflatten(leaves, spec)[0]``, for a ``spec`` of :func:`flatten_one`: the tree itself."""
    return unflatten(leaves, spec[2][0])


def _walk(tree: Any, leaves: list[Any]) -> Any:
    if isinstance(tree, _Tensor):
        leaves.append(tree)
        return _LEAF
    t = type(tree)
    if t is dict or t is tuple or t is list:
        children = tuple(tree.values()) if t is dict else tree
        for x in children:
            if not isinstance(x, _Tensor):
                break
        else:  # only tensors (a parameter dict, a tuple of tensors): no spec per child
            leaves.extend(children)
            same = _same(len(children))
            return (dict, tuple(tree), same) if t is dict else (t, len(tree), same)
        specs = []
        for x in children:
            if isinstance(x, _Tensor):  # inline: most children are tensors
                leaves.append(x)
                specs.append(_LEAF)
            else:
                specs.append(_walk(x, leaves))
        return (dict, tuple(tree), tuple(specs)) if t is dict else (t, len(tree), tuple(specs))
    sub, spec = pytree.tree_flatten(tree)
    leaves.extend(sub)
    return ("pytree", _Spec(spec), len(sub))


class _Spec:
    """A ``pytree`` spec that hashes and compares by its text, so that every spec :func:`flatten`
    returns can be part of a cache key (``TreeSpec`` hashes in some torch releases only)."""

    __slots__ = ("spec", "text")

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.text = str(spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Spec) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return self.text


def unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    if spec is _LEAF:
        return leaves[0]
    kind = spec[0]
    subs = spec[2]
    if kind is tuple and len(subs) == 1 and subs[0] is not _LEAF:  # f's arguments: (tree,)
        return (unflatten(leaves, subs[0]),)
    if (kind is dict or kind is tuple or kind is list) and subs.count(_LEAF) == len(subs):
        # only tensors (a parameter dict, a tuple of tensors): no recursion
        return dict(zip(spec[1], leaves)) if kind is dict else kind(leaves)
    return _build(iter(leaves), spec)


def _build(it: Any, spec: Any) -> Any:
    if spec is _LEAF:
        return next(it)
    kind = spec[0]
    if kind is dict:
        subs = spec[2]
        if all(s is _LEAF for s in subs):  # a parameter dict: no recursion
            return dict(zip(spec[1], it))
        return {k: _build(it, s) for k, s in zip(spec[1], subs)}
    if kind is tuple or kind is list:
        return kind(_build(it, s) for s in spec[2])
    return pytree.tree_unflatten([next(it) for _ in range(spec[2])], spec[1].spec)
