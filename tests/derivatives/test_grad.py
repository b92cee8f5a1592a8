"""gradlab.grad and gradlab.backward: against torch.autograd.grad, float64 finite differences,
and the no-trace contract of backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradlab as gl
from tests._reference import fd_jacobian

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def _f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y.exp() + x**2


@pytest.mark.parametrize("fn", [gl.grad, gl.backward], ids=["grad", "backward"])
@fixture_ok
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_matches_finite_differences_and_autograd(fn, shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    out = _f(x, y)
    gx, gy = fn(out, [x, y], grad_outputs=w, retain_graph=True)
    ax, ay = torch.autograd.grad(out, [x, y], w)
    torch.testing.assert_close(gx, ax)
    torch.testing.assert_close(gy, ay)
    fd = fd_jacobian(lambda z: (_f(z, y.detach()) * w).sum(), x)
    torch.testing.assert_close(gx, fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fn", [gl.grad, gl.backward], ids=["grad", "backward"])
def test_single_tensor_in_gives_tensor_out(fn, device):
    x = torch.randn(3, device=device, requires_grad=True)
    g = fn((x**2).sum(), x)
    assert isinstance(g, torch.Tensor)
    torch.testing.assert_close(g, 2 * x.detach())
    g2 = fn((x**2).sum(), [x])
    assert isinstance(g2, tuple) and len(g2) == 1


@fixture_ok
@given(shape=shapes, seed=st.integers(0, 2**16), create_graph=st.booleans())
def test_backward_equals_grad_and_leaves_grads_untouched(shape, seed, create_graph, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    h = x * 3  # a non-leaf input
    prev_x = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    x.grad = prev_x
    out = (_f(h, y)).sum()
    via_grad = gl.grad(out, [x, y, h], retain_graph=True, create_graph=create_graph)
    via_backward = gl.backward(out, [x, y, h], create_graph=create_graph)
    for a, b in zip(via_grad, via_backward):
        torch.testing.assert_close(a, b)
        assert (a.grad_fn is not None) == create_graph
        assert (b.grad_fn is not None) == create_graph
    assert x.grad is prev_x  # the same object, and its values unchanged
    assert y.grad is None
    assert not h.retains_grad
    assert not h._backward_hooks


def test_backward_restores_grad_values(device):
    x = torch.randn(4, device=device, requires_grad=True)
    x.grad = torch.full((4,), 7.0, device=device)
    before = x.grad.clone()
    gl.backward((x**2).sum(), x)
    torch.testing.assert_close(x.grad, before)


def test_backward_does_not_touch_other_leaves(device):
    w = torch.randn(3, device=device, requires_grad=True)
    x = torch.randn(3, device=device, requires_grad=True)
    gl.backward((w * x).sum(), x)
    assert w.grad is None and x.grad is None


@pytest.mark.parametrize("fn", [gl.grad, gl.backward], ids=["grad", "backward"])
def test_works_under_no_grad(fn, device):
    x = torch.randn(3, device=device, requires_grad=True)
    out = (x**3).sum()
    with torch.no_grad():
        g = fn(out, x, create_graph=True)
    assert g.grad_fn is not None
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, 6 * x.detach())
    out = (x**3).sum()
    with torch.no_grad():
        g = fn(out, x)
    assert g.grad_fn is None
    torch.testing.assert_close(g, 3 * x.detach() ** 2)


@pytest.mark.parametrize("fn", [gl.grad, gl.backward], ids=["grad", "backward"])
def test_unused_modes(fn, device):
    x = torch.randn(3, device=device, requires_grad=True)
    z = torch.randn(2, device=device, requires_grad=True)
    _gx, gz = fn((x**2).sum(), [x, z], retain_graph=True)
    torch.testing.assert_close(gz, torch.zeros(2, device=device))
    _, gz = fn((x**2).sum(), [x, z], unused="none", retain_graph=True)
    assert gz is None
    with pytest.raises(gl.GraphError, match=r"inputs\[1\] \(shape \(2,\)\) is not used"):
        fn((x**2).sum(), [x, z], unused="error")


@pytest.mark.parametrize("fn", [gl.grad, gl.backward], ids=["grad", "backward"])
def test_errors(fn):
    name = fn.__name__
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=rf"{name}: unused must be one of 'zeros', 'none', 'error', got 'zero'\. Did you mean",
    ):
        fn((x**2).sum(), x, unused="zero")
    with pytest.raises(
        ValueError,
        match=rf"{name}: outputs\[0\] must be a scalar when grad_outputs is not given, "
        r"got tensor\(shape=\(3,\)",
    ):
        fn(x**2, x)
    with pytest.raises(
        ValueError,
        match=rf"{name}: grad_outputs\[0\] must be of shape .*, got tensor\(shape=\(2,\)",
    ):
        fn(x**2, x, grad_outputs=torch.ones(2))
    with pytest.raises(
        ValueError, match=rf"{name}: inputs\[0\] must be a tensor that requires grad, got tensor"
    ):
        fn((x**2).sum(), torch.ones(3))
    with pytest.raises(
        TypeError,
        match=rf"{name}: inputs must be a torch.Tensor or a sequence of tensors, got 1\.0",
    ):
        fn((x**2).sum(), 1.0)
    with torch.no_grad():
        out = (x**2).sum()
    with pytest.raises(gl.GraphError, match=rf"{name}: no element of outputs requires grad"):
        fn(out, x)


def test_gradcheck_of_grad_with_create_graph():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def first(z: torch.Tensor) -> torch.Tensor:
        return gl.grad(torch.tanh(z).pow(3).sum(), z, create_graph=True)

    assert torch.autograd.gradcheck(first, (x,))


@pytest.mark.parametrize(
    "case", ["tensor", "parameter", "shape_1", "unused", "no_grad_create_graph", "complex"]
)
def test_the_fast_path_gives_autograd_grad(case):
    """gl.grad's fast path (one scalar output, one input) agrees with torch.autograd.grad, and
    the cases it leaves to the general path too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, dtype=torch.float64, generator=g)
    if case == "parameter":
        x = torch.nn.Parameter(x)
    else:
        x.requires_grad_(True)
    if case == "complex":
        xc = torch.randn(3, dtype=torch.complex128, generator=g, requires_grad=True)
        y = (xc * xc.conj()).sum()  # real-valued, complex dtype: the general path
        w = torch.ones((), dtype=torch.complex128)
        (ref,) = torch.autograd.grad(y, xc, w, retain_graph=True)
        torch.testing.assert_close(gl.grad(y, xc), ref, rtol=0, atol=0)
        return
    other = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    y = (other**2).sum() if case == "unused" else (x.sin() * x).sum()
    if case == "shape_1":
        y = y.reshape(1)
    if case == "unused":
        assert torch.equal(gl.grad(y, x), torch.zeros(3, dtype=torch.float64))
        return
    if case == "no_grad_create_graph":
        with torch.no_grad():
            got = gl.grad(y, x, create_graph=True, retain_graph=True)
        assert got.requires_grad  # create_graph under no_grad: grad mode switched on inside
        assert torch.is_grad_enabled()  # the mode outside the block, untouched
    else:
        got = gl.grad(y, x, retain_graph=True)
        assert got.grad_fn is None
    (ref,) = torch.autograd.grad(y, x, retain_graph=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("container", [list, tuple])
def test_the_fast_path_of_several_inputs_gives_autograd_grad(container):
    """One scalar output and a list/tuple of inputs: the fast path returns what
    torch.autograd.grad returns (a tuple), zeros for an unused input, bit for bit; an input
    that does not require grad still gets the general path's error naming it."""
    g = torch.Generator().manual_seed(0)
    a, b, unused = (
        torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)
    )
    y = (a.sin() * b).sum()
    got = gl.grad(y, container([a, b, unused]), retain_graph=True)
    ref = torch.autograd.grad(y, [a, b], retain_graph=True)
    assert isinstance(got, tuple) and len(got) == 3
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
    assert torch.equal(got[2], torch.zeros(3, dtype=torch.float64))
    with torch.no_grad():
        second = gl.grad(y, container([a, b]), create_graph=True, retain_graph=True)
    assert all(t.requires_grad for t in second)  # create_graph under no_grad
    with pytest.raises(
        ValueError, match=r"grad: inputs\[1\] must be a tensor that requires grad, got tensor"
    ):
        gl.grad(y, container([a, torch.ones(3)]))
