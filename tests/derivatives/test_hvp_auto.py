"""gl.hvp's "auto" cache hit: when the cached strategy is double backward, hvp builds the key
itself and calls the strategy's implementation directly (no dispatch, no run_keyed). These tests
check that this path is the one taken, and that it gives what the general path gives: the same
values (against torch.func and formulas written out), the same graph rule (grad mode off, a
closure over a tensor that requires grad, inputs or tangents that require grad) and the same
errors; and that its key is the one HvpProblem.key gives (the cache is shared)."""

from __future__ import annotations

import pytest
import torch

import gradlab as gl
from gradlab._derivatives import _autotune, _products
from gradlab._derivatives._graph import wants_graph
from gradlab._derivatives._keys import function_key


@pytest.fixture(autouse=True)
def _fresh_cache():
    gl.clear_autotune_cache()
    yield
    gl.clear_autotune_cache()


@pytest.fixture
def general_calls(monkeypatch):
    """How many hvp calls went through run_keyed (the general path of "auto")."""
    calls = []
    real = _products.run_keyed

    def counting(*args, **kwargs):
        calls.append(args[4])  # the key
        return real(*args, **kwargs)

    monkeypatch.setattr(_products, "run_keyed", counting)
    return calls


def _f(p):
    """A scalar of a tensor, a tuple, a dict (with a list inside): sum of sin(a) * b**2 / 2
    over the leaves taken in pairs, and cubes of the rest."""
    leaves = torch.utils._pytree.tree_leaves(p)
    out = sum((t**3).sum() for t in leaves)
    return out + (torch.sin(leaves[0]) * leaves[0] ** 2).sum() / 2


def _reference(f, args, v):
    """torch.func's forward-over-reverse HVP: an independent reference."""
    prim = args if isinstance(args, tuple) else (args,)
    tan = v if isinstance(v, tuple) else (v,)
    nums = tuple(range(len(prim)))
    (_, hv) = torch.func.jvp(torch.func.grad(f, nums), prim, tan)
    return f(*prim), (hv if isinstance(args, tuple) else hv[0])


def _assert_tree_close(a, b):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def _structures(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    return {
        "tensor": (r(3), r(3)),
        "tuple": ((r(3), r(2, 2)), (r(3), r(2, 2))),
        "dict": ({"w": r(2, 3), "b": r(3)}, {"w": r(2, 3), "b": r(3)}),
        "nested": ({"w": [r(2), r(3)], "b": r(1)}, {"w": [r(2), r(3)], "b": r(1)}),
    }


@pytest.mark.parametrize("structure", ["tensor", "tuple", "dict", "nested"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_hit_is_direct_and_matches_torch_func(structure, grad_mode, general_calls, device):
    args, v = _structures(device)[structure]
    f = (lambda *a: _f(a)) if isinstance(args, tuple) else _f
    value_ref, hv_ref = _reference(f, args, v)
    with gl.autotune(False), torch.set_grad_enabled(grad_mode):
        first = gl.hvp(f, args, v)  # a miss: the general path (checks, then the heuristic)
        assert len(general_calls) == 1
        second = gl.hvp(f, args, v)  # a hit: double backward called directly
        assert len(general_calls) == 1
        named = gl.hvp(f, args, v, strategy="double-backward")
        assert torch.is_grad_enabled() == grad_mode  # left as it was
    for r in (first, second, named):
        assert isinstance(r, gl.HVP) and type(r.hvp) is type(hv_ref)
        torch.testing.assert_close(r.value, value_ref, rtol=1e-12, atol=1e-12)
        _assert_tree_close(r.hvp, hv_ref)
        leaves = torch.utils._pytree.tree_leaves(r)
        assert all(t.grad_fn is None and not t.requires_grad for t in leaves)
    # the key hvp built is HvpProblem.key's (shared with run_auto)
    prim = args if isinstance(args, tuple) else (args,)
    tan = v if isinstance(v, tuple) else (v,)
    with torch.set_grad_enabled(grad_mode):
        key = ("hvp", function_key(f), *_products.HvpProblem(f, prim, tan).key())
    assert general_calls[0] == key and key in _autotune._CACHE


def test_hit_with_measurement_on_once_double_backward_is_chosen(general_calls):
    """With measurement on, the hit path is taken once the key's choice is double backward."""
    x, v = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    f = _f
    gl.hvp(f, x, v)
    (key,) = [k for k in _autotune._CACHE if k[0] == "hvp"]
    old = _autotune._CACHE[key]
    _autotune._store(key, _autotune._Entry(old.heuristic, "double-backward", "test"))
    n = len(general_calls)
    r = gl.hvp(f, x, v)
    assert len(general_calls) == n
    _assert_tree_close(r.hvp, _reference(f, x, v)[1])
    _autotune._store(key, _autotune._Entry(old.heuristic, "rev-rev", "test"))
    r = gl.hvp(f, x, v)  # another choice: the general path, with the key built once
    assert len(general_calls) == n + 1 and general_calls[-1] == key
    _assert_tree_close(r.hvp, _reference(f, x, v)[1])


def test_hit_keeps_the_graph_of_a_closed_over_tensor(general_calls, device):
    """f = sum(w * x**3): H v = 6 w x v, so d/dw sum(H v) = 6 x v and d/dw value = x**3."""
    g = torch.Generator().manual_seed(1)
    x, v = (torch.randn(5, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    w = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)

    def f(x):
        return (w * x**3).sum()

    with gl.autotune(False):
        gl.hvp(f, x, v)
        value, hv = gl.hvp(f, x, v)
    assert len(general_calls) == 1  # the second call was a hit
    assert value.grad_fn is not None and hv.grad_fn is not None
    torch.testing.assert_close(hv, 6 * w.detach() * x * v)
    (dw,) = torch.autograd.grad(hv.sum(), w)
    torch.testing.assert_close(dw, 6 * x * v)
    (dw,) = torch.autograd.grad(value, w)
    torch.testing.assert_close(dw, x**3)
    with gl.autotune(False), torch.no_grad():  # grad mode off: no graph, even so
        gl.hvp(f, x, v)
        value, hv = gl.hvp(f, x, v)
    assert value.grad_fn is None and hv.grad_fn is None


@pytest.mark.parametrize("which", ["args", "v"])
def test_hit_keeps_the_graph_of_inputs_and_tangents_that_require_grad(which, general_calls):
    """f = sum(x**3): H v = 6 x v, so d/dx sum(H v) = 6 v and d/dv sum(H v) = 6 x."""
    g = torch.Generator().manual_seed(2)
    x, v = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    leaf = x if which == "args" else v
    leaf.requires_grad_(True)

    def f(x):
        return (x**3).sum()

    with gl.autotune(False):
        gl.hvp(f, x, v)
        value, hv = gl.hvp(f, x, v)
    assert len(general_calls) == 1
    assert hv.grad_fn is not None
    assert (value.grad_fn is not None) == (which == "args")
    (d,) = torch.autograd.grad(hv.sum(), leaf)
    torch.testing.assert_close(d, 6 * (v if which == "args" else x).detach())
    assert x.grad is None and v.grad is None  # nothing accumulated into the caller's tensors


def _error_of(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


def test_errors_are_the_general_paths(general_calls):
    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    # a non-tensor leaf: refused on every call (a miss: nothing is cached for it)
    args, tangents = {"w": x, "n": 3}, {"w": v, "n": 3}
    for _ in range(2):
        assert _error_of(lambda: gl.hvp(_f, args, tangents)) == _error_of(
            lambda: gl.hvp(_f, args, tangents, strategy="double-backward")
        )
    assert not any(k[0] == "hvp" for k in _autotune._CACHE)
    # an f whose output stops being a scalar after its key was cached: the error of a hit is
    # the one the named strategy raises
    mode = ["scalar"]

    def f(x):
        return (x**3).sum() if mode[0] == "scalar" else x**3

    with gl.autotune(False):
        gl.hvp(f, x, v)
        mode[0] = "vector"
        n = len(general_calls)
        hit = _error_of(lambda: gl.hvp(f, x, v))
        assert len(general_calls) == n  # it was a hit
        assert hit == _error_of(lambda: gl.hvp(f, x, v, strategy="double-backward"))
    assert hit[0] is ValueError and "scalar" in hit[1]
    # v of another shape: a new key, so a miss, whose checks refuse it
    mode[0] = "scalar"
    assert _error_of(lambda: gl.hvp(f, x, v[:2])) == _error_of(
        lambda: gl.hvp(f, x, v[:2], strategy="double-backward")
    )


def _graphs():
    """(name, build) pairs: build() -> (output, stand-ins zs, reached, expected)."""

    def fresh(n):
        return [torch.randn(3, dtype=torch.float64).requires_grad_(True) for _ in range(n)]

    w = torch.randn(3, dtype=torch.float64).requires_grad_(True)  # closed over

    def used_twice():
        (z,) = fresh(1)
        return (z * z).sum(), [z], 1, False

    def outer_once():
        z1, z2 = fresh(2)
        return (z1**2 * w).sum(), [z1, z2], 1, True

    def outer_only():
        (z,) = fresh(1)
        return (w**2).sum(), [z], 0, True

    def outer_non_leaf():
        (z,) = fresh(1)
        w2 = w * 2  # a tensor computed outside from one that requires grad
        return (z * w2).sum(), [z], 1, True

    def all_ours():
        z1, z2, z3 = fresh(3)
        return (z1 @ z2 + torch.tanh(z3).sum()) ** 2, [z1, z2, z3], 3, False

    def one_unused():
        z1, z2 = fresh(2)
        return (z1**3).sum(), [z1, z2], 1, False

    return {
        f.__name__: f
        for f in (used_twice, outer_once, outer_only, outer_non_leaf, all_ours, one_unused)
    }


@pytest.mark.parametrize("name", list(_graphs()))
def test_wants_graph_counting_agrees_with_looking_at_each_leaf(name):
    """wants_graph(reached=...) (the count of the inputs with a gradient) against the walk that
    looks at every leaf (reached=None) and the answer known by construction."""
    out, zs, reached, expected = _graphs()[name]()
    grads = torch.autograd.grad(out, zs, create_graph=True, allow_unused=True)
    assert sum(g is not None for g in grads) == reached
    assert wants_graph(True, [out], zs, False) is expected
    assert wants_graph(True, [out], zs, False, reached) is expected
    assert wants_graph(False, [out], zs, False, reached) is False
