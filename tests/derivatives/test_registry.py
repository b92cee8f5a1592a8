"""The strategy registries: every strategy of every operation returns torch.func's values *and*
differentiability (requires_grad and the gradient through the result), one dispatch, errors."""

from __future__ import annotations

import pytest
import torch

import gradlab as gl
from gradlab._derivatives import OPERATIONS

SCENARIOS = ["nothing", "input", "closure", "tangent", "no_grad"]


def _setup(scenario: str):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64)
    if scenario in ("input", "no_grad"):
        x.requires_grad_(True)
    if scenario == "closure":
        W.requires_grad_(True)
    if scenario == "tangent":
        v.requires_grad_(True)
    return W, x, v


def _nested_func_derivative(f, k):
    d = f
    for _ in range(k):
        d = (lambda h: lambda z: torch.func.grad(lambda u: h(u).sum())(z))(d)
    return d


def _call(op: str, strategy: str, W, x, v, reference: bool):
    """The operation through gradlab (strategy) or through torch.func (reference)."""
    if op == "jacobian":

        def f(z):
            return torch.tanh(W @ z) * z.sum()

        return torch.func.jacrev(f)(x) if reference else gl.jacobian(f, x, strategy=strategy)
    if op == "hessian":

        def f(z):
            return torch.tanh(W @ z).pow(2).sum() + z.pow(3).sum()

        return torch.func.hessian(f)(x) if reference else gl.hessian(f, x, strategy=strategy)
    if op == "hvp":

        def f(z):
            return torch.tanh(W @ z).pow(2).sum() + z.pow(3).sum()

        if reference:
            (_, value), (hv, _) = torch.func.jvp(torch.func.grad_and_value(f), (x,), (v,))
            return value, hv
        return tuple(gl.hvp(f, x, v, strategy=strategy))

    w = W[0, 0]

    def f(z):
        return torch.sin(w * z) * torch.exp(z / 3)

    if reference:
        return _nested_func_derivative(f, 3)(x)
    return gl.derivative(f, x, order=3, strategy=strategy)


def _leaves(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("op", "strategy"),
    [(op, s) for op, o in OPERATIONS.items() for s in (*o.names, "auto")],
)
def test_every_strategy_has_torch_func_differentiability(op, strategy, scenario):
    if scenario == "tangent" and op != "hvp":
        pytest.skip("only hvp takes a tangent")
    W, x, v = _setup(scenario)
    with torch.set_grad_enabled(scenario != "no_grad"):
        got = _leaves(_call(op, strategy, W, x, v, reference=False))
        ref = _leaves(_call(op, strategy, W, x, v, reference=True))
    wrt = [t for t in (W, x, v) if t.requires_grad]
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b)
        assert a.requires_grad == b.requires_grad, (i, a.requires_grad, b.requires_grad)
        if b.requires_grad and scenario != "no_grad":
            weights = torch.randn(
                b.shape, dtype=b.dtype, generator=torch.Generator().manual_seed(i)
            )
            ga = torch.autograd.grad((a * weights).sum(), wrt, allow_unused=True, retain_graph=True)
            gb = torch.autograd.grad((b * weights).sum(), wrt, allow_unused=True, retain_graph=True)
            for p, q in zip(ga, gb):
                if q is None:
                    assert p is None or torch.count_nonzero(p) == 0
                else:
                    torch.testing.assert_close(p, q)


def test_the_issue_example_backward_through_loop_jacobian():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for s in gl._derivatives.JACOBIAN.names:
        J = gl.jacobian(torch.sin, x, strategy=s)
        J.pow(2).sum().backward()
        torch.testing.assert_close(x.grad, -2 * torch.sin(x.detach()) * torch.cos(x.detach()))
        x.grad = None


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_unknown_strategy_lists_the_registry(op):
    x = torch.randn(3)
    names = ", ".join(repr(s) for s in ("auto", *OPERATIONS[op].names))
    call = {
        "jacobian": lambda: gl.jacobian(torch.sin, x, strategy="fastest"),
        "hessian": lambda: gl.hessian(torch.sin, x, strategy="fastest"),
        "hvp": lambda: gl.hvp(torch.sin, x, x, strategy="fastest"),
        "derivative": lambda: gl.derivative(torch.sin, x, strategy="fastest"),
    }[op]
    with pytest.raises(
        ValueError, match=rf"{op}: strategy must be one of {names}, got 'fastest'\. Pass one of"
    ):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda x: gl.jacobian(3, x),
        lambda x: gl.hessian("f", x),
        lambda x: gl.hvp(None, x, x),
        lambda x: gl.derivative(1.0, x),
        lambda x: gl.vjp([], x, x),
        lambda x: gl.jvp(x, x, x),
    ],
    ids=["jacobian", "hessian", "hvp", "derivative", "vjp", "jvp"],
)
def test_non_callable_f(call):
    with pytest.raises(
        TypeError, match=r"^\w+: f must be (a callable|an elementwise function).*, got .*\. Pass "
    ):
        call(torch.randn(3))


def test_argnums_out_of_range():
    x = torch.randn(3)
    with pytest.raises(
        ValueError,
        match=r"jacobian: argnums must be in range for 2 argument\(s\), got -3\. Use 0\.\.1",
    ):
        gl.jacobian(torch.add, x, x, argnums=-3)
    with pytest.raises(
        ValueError, match=r"hessian: argnums must be in range for 2 argument\(s\), got \(1, 2\)"
    ):
        gl.hessian(lambda a, b: (a * b).sum(), x, x, argnums=(1, 2))


def test_forward_strategy_without_forward_formula_reports_and_auto_falls_back():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"jacobian: strategy must be one that can run this f, got 'forward'\. "
        r".*Use strategy='reverse'",
    ):
        gl.jacobian(NoJvp.apply, x, strategy="forward")
    gl.clear_autotune_cache()
    for enabled in (True, False):
        with gl.autotune(enabled):
            torch.testing.assert_close(
                gl.jacobian(NoJvp.apply, x), 2 * torch.eye(3, dtype=torch.float64)
            )


def _half_constant(z):
    with torch.no_grad():
        scale = z.exp()  # a constant for reverse mode (torch.func.grad respects this too)
    return (z.sin() * scale).sum()


@pytest.mark.parametrize(
    ("op", "forward", "call", "reference"),
    [
        (
            "jacobian",
            "forward",
            lambda f, x, s: gl.jacobian(lambda z: f(z) * z, x, strategy=s),
            lambda f, x: torch.func.jacrev(lambda z: f(z) * z)(x),
        ),
        (
            "hessian",
            "fwd-rev",
            lambda f, x, s: gl.hessian(f, x, strategy=s),
            lambda f, x: torch.func.jacrev(torch.func.grad(f))(x),
        ),
        (
            "hvp",
            "fwd-rev",
            lambda f, x, s: gl.hvp(f, x, torch.ones_like(x), strategy=s).hvp,
            lambda f, x: torch.func.jacrev(torch.func.grad(f))(x).sum(1),
        ),
    ],
    ids=["jacobian", "hessian", "hvp"],
)
def test_forward_mode_refuses_code_run_without_grad_and_auto_falls_back(
    op, forward, call, reference
):
    """Forward mode would differentiate through torch.no_grad(); reverse mode does not."""
    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=rf"{op}: strategy must be one that can run this f, got '{forward}'\. .*grad mode off",
    ):
        call(_half_constant, x, forward)
    expected = reference(_half_constant, x)
    for s in OPERATIONS[op].names:
        if s != forward:
            torch.testing.assert_close(call(_half_constant, x, s), expected)
    for enabled in (True, False):
        gl.clear_autotune_cache()
        with gl.autotune(enabled):
            torch.testing.assert_close(call(_half_constant, x, "auto"), expected)
    gl.clear_autotune_cache()
