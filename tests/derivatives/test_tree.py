"""gradlab._derivatives._tree: the fast flatten/unflatten agrees with torch's pytree."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._tree import _walk, flatten, flatten_one, unflatten, unflatten_one

Pair = namedtuple("Pair", ["a", "b"])
T = [torch.full((i + 1,), float(i)) for i in range(6)]

TREES = {
    "tensor": T[0],
    "tuple": (T[0], T[1]),
    "list": [T[0], T[1], T[2]],
    "dict": {"w": T[0], "b": T[1]},
    "nested": ({"w": T[0], "b": [T[1], (T[2],)]}, T[3]),
    "namedtuple": Pair(T[0], {"x": T[1]}),
    "ordereddict": OrderedDict(w=T[0], b=T[1]),
    "empty": (),
    "one-tensor-tuple": (T[0],),
    "one-dict-tuple": ({"w": T[0], "b": T[1]},),  # hvp's arguments for a parameter dict
    "one-list-tuple": ([T[0], T[1]],),
    "one-nested-tuple": ((T[0], [T[1]]),),
    "list-in-dict": {"w": [T[0], T[1]], "b": T[2]},
    "empty-dict-tuple": ({},),
    "empty-dict": {},
}


@pytest.mark.parametrize("name", list(TREES))
def test_flatten_matches_pytree_and_round_trips(name):
    tree = TREES[name]
    leaves, spec = flatten(tree)
    ref_leaves, ref_spec = pytree.tree_flatten(tree)
    assert [id(t) for t in leaves] == [id(t) for t in ref_leaves]
    rebuilt = unflatten(leaves, spec)
    assert pytree.tree_flatten(rebuilt)[1] == ref_spec
    assert type(rebuilt) is type(tree)


def test_specs_compare_by_structure():
    a = flatten({"w": T[0], "b": (T[1], T[2])})[1]
    b = flatten({"w": T[3], "b": (T[4], T[5])})[1]
    c = flatten({"b": (T[1], T[2]), "w": T[0]})[1]  # other key order: another structure
    d = flatten({"w": T[0], "b": [T[1], T[2]]})[1]  # list, not tuple
    assert a == b and a != c and a != d


@pytest.mark.parametrize("name", list(TREES))
def test_flatten_one_is_flatten_of_the_one_tuple(name):
    """flatten_one(x) (hvp's single argument, dicts and tensors inline) gives the leaves and spec
    the general walk gives for (x,), and unflatten_one rebuilds x itself."""
    tree = TREES[name]
    leaves, spec = flatten_one(tree)
    walked: list = []
    assert spec == (tuple, 1, (_walk(tree, walked),))
    assert [id(t) for t in leaves] == [id(t) for t in walked]
    assert (leaves, spec) == flatten((tree,))
    rebuilt = unflatten_one(leaves, spec)
    assert type(rebuilt) is type(tree)
    assert pytree.tree_flatten(rebuilt)[1] == pytree.tree_flatten(tree)[1]
    assert [id(t) for t in pytree.tree_leaves(rebuilt)] == [id(t) for t in leaves]
    assert unflatten(leaves, spec)[0].__class__ is type(tree)


def test_flatten_one_of_a_long_parameter_dict():
    """An all-tensor dict of 64 or more entries (beyond the table of child specs)."""
    tree = {f"p{i}": T[i % 6] for i in range(70)}
    leaves, spec = flatten_one(tree)
    walked: list = []
    assert spec == (tuple, 1, (_walk(tree, walked),)) and len(leaves) == 70
    assert unflatten_one(leaves, spec) == tree
