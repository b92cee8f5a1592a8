"""gradlab.derivative: closed forms, nested autograd, float64 finite differences, every strategy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradlab as gl
from gradlab._derivatives import DERIVATIVE

STRATEGIES = [*DERIVATIVE.names, "auto"]
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=5)


def _nested_autograd(f, x, k):
    z = x.detach().requires_grad_(True)
    y = f(z)
    for _ in range(k):
        (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    return y.detach()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", range(1, 9))
def test_sin_closed_form(strategy, k, device):
    if strategy == "forward" and k > 5:
        pytest.skip("nested jvp costs 2^k+: too slow for a unit test above order 5")
    x = torch.linspace(-3, 3, 11, dtype=torch.float64, device=device)
    closed = [torch.sin, torch.cos, lambda z: -torch.sin(z), lambda z: -torch.cos(z)][k % 4]
    got = gl.derivative(torch.sin, x, order=k, strategy=strategy)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, closed(x), atol=1e-12, rtol=1e-12)


def _mix(z):
    return z.sin() * z.exp() / (2 + z.cos()) + F.softplus(z) + torch.erf(z) + torch.atan(z) + 2**z


FUNCS = {
    "exp": torch.exp,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "rational_pow": lambda z: (z * z + 1) ** -1.5,
    "log": lambda z: torch.log(z * z + 1) + torch.log1p(z.abs()),
    "gelu": F.gelu,
    "sqrt": lambda z: (z * z + 1).sqrt() + (z * z + 2).rsqrt(),
    "tan_cosh": lambda z: torch.tan(z / 3) * torch.cosh(z) - torch.sinh(z) + z.square(),
    "mix": _mix,
    "poly": lambda z: 3 * z**5 - z**2 / 2 + 1,
}


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("strategy", ["taylor", "auto"])
def test_against_nested_autograd(name, strategy, device):
    f = FUNCS[name]
    x = torch.linspace(-1.5, 1.5, 9, dtype=torch.float64, device=device)
    for k in (1, 2, 3, 5):
        torch.testing.assert_close(
            gl.derivative(f, x, order=k, strategy=strategy), _nested_autograd(f, x, k)
        )


@fixture_ok
@given(k=st.integers(1, 2), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("strategy", DERIVATIVE.names)
@pytest.mark.parametrize("name", ["exp", "tanh", "mix"])
def test_against_float64_finite_differences(strategy, name, k, seed, device):
    f = FUNCS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    h = 1e-4 if k == 1 else 1e-3
    if k == 1:
        fd = (f(x + h) - f(x - h)) / (2 * h)
    else:
        fd = (f(x + h) - 2 * f(x) + f(x - h)) / h**2
    got = gl.derivative(f, x, order=k, strategy=strategy)
    torch.testing.assert_close(got, fd, atol=1e-5, rtol=1e-5)


def test_exp_high_order_and_relu(device):
    x = torch.randn(5, dtype=torch.float64, device=device)
    for k in range(1, 9):
        torch.testing.assert_close(gl.derivative(torch.exp, x, order=k, strategy="taylor"), x.exp())
    torch.testing.assert_close(
        gl.derivative(lambda z: torch.relu(z) * z, x, order=2, strategy="taylor"),
        2.0 * (x > 0).double(),
    )


def test_unsupported_op_falls_back_in_auto_and_errors_in_taylor():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)

    def f(z):
        return torch.special.i0(z)  # no Taylor rule

    with pytest.raises(
        ValueError,
        match=r"derivative: strategy must be one that can run this f, got 'taylor'\. "
        r"Taylor mode does not support the op special_i0",
    ):
        gl.derivative(f, x, order=2, strategy="taylor")
    for enabled in (True, False):
        with gl.autotune(enabled):
            torch.testing.assert_close(gl.derivative(f, x, order=2), _nested_autograd(f, x, 2))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_create_graph_gives_differentiable_result(strategy, device):
    w = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.linspace(-1, 1, 4, dtype=torch.float64, device=device)
    d2 = gl.derivative(lambda z: torch.sin(w * z), x, order=2, strategy=strategy, create_graph=True)
    # d2 = -w^2 sin(w x); d/dw sum(d2) = sum(-2 w sin(wx) - w^2 x cos(wx))
    (gw,) = torch.autograd.grad(d2.sum(), w)
    wd = w.detach()
    expected = (-2 * wd * torch.sin(wd * x) - wd**2 * x * torch.cos(wd * x)).sum()
    torch.testing.assert_close(gw, expected)
    assert gl.derivative(torch.sin, x, order=2, strategy=strategy).grad_fn is None


def test_works_under_no_grad(device):
    x = torch.randn(4, device=device)
    with torch.no_grad():
        for s in STRATEGIES:
            torch.testing.assert_close(gl.derivative(torch.sin, x, order=2, strategy=s), -x.sin())


def test_errors():
    x = torch.randn(3)
    with pytest.raises(
        ValueError, match=r"derivative: order must be an int >= 1, got 0\. Pass an int >= 1"
    ):
        gl.derivative(torch.sin, x, order=0)
    with pytest.raises(
        ValueError, match=r"derivative: strategy must be one of .*'taylor'.*, got 'jet'"
    ):
        gl.derivative(torch.sin, x, strategy="jet")
    with pytest.raises(
        TypeError,
        match=r"derivative: x must be a floating-point tensor, got tensor\(.*dtype=torch.int64",
    ):
        gl.derivative(torch.sin, torch.arange(3))
    for s in STRATEGIES:
        with pytest.raises(ValueError, match=r"derivative: f must be elementwise"):
            gl.derivative(lambda z: z.sin().sum(), x, order=1, strategy=s)


def test_factorial_scaling_of_constant_coefficient():
    # the k-th derivative of z^k is k!, a constant coefficient
    x = torch.randn(3, dtype=torch.float64)
    for k in range(1, 7):
        got = gl.derivative(lambda z, k=k: z**k, x, order=k, strategy="taylor")
        torch.testing.assert_close(got, torch.full_like(x, float(math.factorial(k))))
        got = gl.derivative(lambda z, k=k: z**k, x, order=k + 1, strategy="taylor")
        torch.testing.assert_close(got, torch.zeros_like(x))


class _StraightThrough(torch.autograd.Function):
    """Forward 2x, backward identity: its 'derivative' is the backward, not the forward's."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return g


NO_TAYLOR_RULE = {
    "where": lambda z: torch.where(z > 0, z**3, torch.sin(z)),
    "comparison": lambda z: (z >= 0.2).to(z.dtype) * z**4 + z.exp(),
    "indexing": lambda z: z[torch.arange(z.shape[0])] ** 3,
    "clamp": lambda z: torch.clamp(z, min=-0.5) ** 3,
    "custom_function": lambda z: _StraightThrough.apply(z) ** 3,
    "no_grad_inside": lambda z: z**3 * _detached_scale(z),
}


def _detached_scale(z):
    with torch.no_grad():
        return z.exp()


@pytest.mark.parametrize("name", NO_TAYLOR_RULE)
@pytest.mark.parametrize("strategy", ["auto", "reverse", "forward"])
def test_ops_without_taylor_rule_fall_back_per_call(name, strategy):
    f = NO_TAYLOR_RULE[name]
    x = torch.tensor([-1.3, -0.4, 0.35, 0.9, 1.7], dtype=torch.float64)
    if strategy == "forward" and name in ("custom_function", "no_grad_inside"):
        # forward mode would differentiate through them, reverse mode does not: refused
        with pytest.raises(
            ValueError,
            match=r"derivative: strategy must be one that can run this f, got 'forward'\. .*grad",
        ):
            gl.derivative(f, x, order=2, strategy=strategy)
        return
    for enabled in (True, False):
        gl.clear_autotune_cache()
        with gl.autotune(enabled):
            for k in range(1, 5):
                got = gl.derivative(f, x, order=k, strategy=strategy)
                torch.testing.assert_close(got, _nested_autograd(f, x, k))
    with pytest.raises(
        ValueError,
        match=r"derivative: strategy must be one that can run this f, got 'taylor'\. Taylor mode",
    ):
        gl.derivative(f, x, order=2, strategy="taylor")


def test_taylor_still_cached_where_supported_and_fallback_cached_where_not():
    gl.clear_autotune_cache()
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    with gl.autotune(False):
        gl.derivative(NO_TAYLOR_RULE["where"], x, order=2)
        gl.derivative(torch.tanh, x, order=2)
    heuristics = sorted(e.heuristic for e in gl._derivatives._autotune._CACHE.values())
    assert heuristics == ["reverse", "taylor"]
    gl.clear_autotune_cache()
