"""Tests of gradlab.testing.numerical_jacobian (gradlab/testing/numerical.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks._planted import tanh_affine
from benchmarks._planted import tanh_problem as problem
from gradlab.testing import check_gradients, numerical_jacobian
from gradlab.testing import strategies as gst


def _autograd_jacobian(fn, *inputs):
    """Independent reference: a naive loop of torch.autograd.grad, one output element at a time."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    blocks = []
    for o in outs:
        rows = [[] for _ in xs]
        for r in range(o.numel()):
            gs = torch.autograd.grad(o.reshape(-1)[r], xs, retain_graph=True, allow_unused=True)
            for j, (g, x) in enumerate(zip(gs, xs)):
                rows[j].append(
                    torch.zeros(x.numel(), dtype=o.dtype) if g is None else g.reshape(-1)
                )
        blocks.append(tuple(torch.stack(r) for r in rows))
    return tuple(blocks)


def test_closed_forms(device) -> None:
    x = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64, device=device)
    ((j_sin,),) = numerical_jacobian(torch.sin, x)
    assert torch.allclose(j_sin, torch.diag(x.cos()), atol=1e-9, rtol=0)
    A = torch.randn(4, 3, dtype=torch.float64, device=device)
    ((j_lin,),) = numerical_jacobian(lambda v: A @ v, x)
    assert torch.allclose(j_lin, A, atol=1e-9, rtol=0)


def test_structure_is_outputs_by_inputs_of_2d_blocks() -> None:
    a = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)

    def fn(p, q):
        return p @ q, (p.sin() * q).sum(), q.exp()

    blocks = numerical_jacobian(fn, a, b)
    assert [[tuple(blk.shape) for blk in row] for row in blocks] == [
        [(2, 6), (2, 3)],
        [(1, 6), (1, 3)],
        [(3, 6), (3, 3)],
    ]
    ref = _autograd_jacobian(fn, a, b)
    for row, ref_row in zip(blocks, ref):
        for blk, ref_blk in zip(row, ref_row):
            assert torch.allclose(blk, ref_blk, atol=1e-8, rtol=1e-7)
    ((single,),) = numerical_jacobian(torch.exp, torch.tensor(0.5, dtype=torch.float64))
    assert single.shape == (1, 1)  # also one scalar in, one scalar out: the same structure


@pytest.mark.parametrize(
    ("dtype", "method", "bound"),
    [
        (torch.float64, "central", 1e-9),
        (torch.float64, "richardson", 1e-11),
        (torch.float32, "central", 1e-4),
        (torch.float32, "richardson", 3e-5),
    ],
)
def test_accuracy_on_tanh_affine(dtype, method, bound) -> None:
    A, x = problem(64)
    exact = torch.func.jacrev(lambda v: torch.tanh(A @ v))(x)
    ((J,),) = numerical_jacobian(lambda v: torch.tanh(A.to(dtype) @ v), x.to(dtype), method=method)
    assert J.dtype == dtype
    assert (J.double() - exact).abs().max() < bound


def test_richardson_beats_central_in_float32() -> None:
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    exact = torch.diag(torch.cos(x))
    errs = {
        m: (numerical_jacobian(torch.sin, x.float(), method=m)[0][0].double() - exact).abs().max()
        for m in ("central", "richardson")
    }
    assert errs["richardson"] < errs["central"] / 2


def test_batched_evaluation_is_used_when_possible() -> None:
    calls = {"n": 0}

    def fn(v):
        calls["n"] += 1
        return v.sin() * 2

    x = torch.randn(40, dtype=torch.float64)
    numerical_jacobian(fn, x)
    assert calls["n"] <= 3  # f(x) once, then all 80 perturbed points in one vmapped call


@pytest.mark.parametrize("kind", ["item", "old-style Function", "branch on value"])
def test_loop_fallback_gives_the_same_jacobian(kind: str) -> None:
    A, x = problem(12)
    smooth = lambda v: torch.tanh(A @ v)
    if kind == "item":
        fn = lambda v: torch.tanh(A @ v) * (1.0 + 0.0 * v.sum().item())
    elif kind == "old-style Function":
        fn = tanh_affine(A, style="old")
    else:
        fn = lambda v: torch.tanh(A @ v) if bool(v.sum() < 1e9) else v
    calls = {"n": 0}

    def counted(v):
        calls["n"] += 1
        return fn(v)

    ((J,),) = numerical_jacobian(counted, x)
    ((ref,),) = numerical_jacobian(smooth, x)
    # Batched and single matmuls round differently; the difference quotient amplifies that.
    assert torch.allclose(J, ref, atol=1e-9, rtol=0)
    assert calls["n"] >= 2 * 12  # the loop really ran


def test_non_contiguous_input_gives_the_contiguous_result(device) -> None:
    base = torch.randn(5, 8, dtype=torch.float64, device=device)
    x = base.T[::2]  # (4, 5), strided
    assert not x.is_contiguous()
    fn = lambda v: (v.exp() * torch.arange(5.0, dtype=v.dtype, device=v.device)).sum(0)
    ((J,),) = numerical_jacobian(fn, x)
    ((ref,),) = numerical_jacobian(fn, x.contiguous())
    assert torch.allclose(J, ref, atol=1e-12, rtol=0)


def test_chunking_and_inputs_untouched() -> None:
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    fn = lambda v: v.tanh().cumsum(1)
    ((a,),) = numerical_jacobian(fn, x, chunk_size=3)
    ((b,),) = numerical_jacobian(fn, x)
    assert torch.equal(a, b)
    assert torch.equal(x.detach(), before) and x.requires_grad and x.grad is None


def test_eps_is_used() -> None:
    x = torch.tensor([1.0], dtype=torch.float64)
    ((J,),) = numerical_jacobian(lambda v: v**3, x, eps=0.1)
    assert J.item() == pytest.approx(3.0 + 0.1**2, rel=1e-12)  # central: f' + h^2 f'''/6


def test_bad_arguments() -> None:
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"numerical_jacobian: inputs\[0\] must be a torch.Tensor, got \[1.0, 2.0\]"
    ):
        numerical_jacobian(torch.sin, [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"numerical_jacobian: inputs\[0\] must be a floating tensor"
    ):
        numerical_jacobian(torch.sin, torch.ones(2, dtype=torch.int32))
    with pytest.raises(
        TypeError,
        match=(
            "numerical_jacobian: fn's return value must be a tensor or a tuple of tensors, got 'x'"
        ),
    ):
        numerical_jacobian(lambda v: "x", x)
    with pytest.raises(ValueError, match="numerical_jacobian: method must be one of"):
        numerical_jacobian(torch.sin, x, method="forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numerical_jacobian: eps must be a finite number > 0"):
        numerical_jacobian(torch.sin, x, eps=0.0)
    with pytest.raises(
        ValueError, match="numerical_jacobian: chunk_size must be an int >= 1, got 0"
    ):
        numerical_jacobian(torch.sin, x, chunk_size=0)
    with pytest.raises(ValueError, match="numerical_jacobian: inputs must be on one device"):
        numerical_jacobian(torch.mul, x, torch.ones(2, dtype=torch.float64, device="meta"))


# ----------------------------------------------------------------------------- properties

_UNARY = {
    "sin": torch.sin,
    "tanh": torch.tanh,
    "exp_bounded": lambda h: torch.exp(torch.tanh(h)),
    "softplus": torch.nn.functional.softplus,
    "square": lambda h: h * h,
    "sigmoid": torch.sigmoid,
}
_BINARY = {
    "mul": lambda h, w, m: h * w,
    "add": lambda h, w, m: h + w,
    "matmul": lambda h, w, m: h @ m,
}


@st.composite
def _programs(draw):
    """A random composition of smooth ops on (x, w, m): a list of op names and a final reducer."""
    ops = draw(st.lists(st.sampled_from(sorted(_UNARY) + sorted(_BINARY)), min_size=1, max_size=4))
    return ops, draw(st.sampled_from(["none", "sum", "sum_last"]))


def _compose(ops, reducer):
    def fn(x, w, m):
        h = x
        for op in ops:
            h = _UNARY[op](h) if op in _UNARY else _BINARY[op](h, w, m)
        if reducer == "sum":
            return h.sum()
        return h.sum(-1) if reducer == "sum_last" else h

    return fn


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    program=_programs(),
    shape=gst.shapes(min_dims=1, max_dims=3, max_side=4),
    data=st.data(),
)
def test_autograd_agrees_with_numerical_jacobian(device, program, shape, data) -> None:
    fn = _compose(*program)
    k = shape[-1]
    x = data.draw(gst.tensors(shape=shape, device=device, layout="any"), label="x")
    w = data.draw(gst.tensors(shape=shape, device=device), label="w")
    m = data.draw(gst.tensors(shape=(k, k), device=device, min_value=-1, max_value=1), label="m")
    numerical = numerical_jacobian(fn, x, w, m)
    analytical = _autograd_jacobian(fn, x.cpu(), w.cpu(), m.cpu())
    for row, ref_row in zip(numerical, analytical):
        for blk, ref in zip(row, ref_row):
            scale = 1.0 + ref.abs().max().item()
            assert torch.allclose(blk.cpu(), ref, atol=1e-7 * scale, rtol=1e-6)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15)
@given(
    program=_programs(),
    shape=gst.shapes(min_dims=1, max_dims=2, max_side=4),
    dtype=gst.dtypes(),
    mode=st.sampled_from(["full", "fast"]),
    data=st.data(),
)
def test_check_gradients_passes_correct_compositions(device, program, shape, dtype, mode, data):
    fn = _compose(*program)
    k = shape[-1]
    x = data.draw(gst.tensors(shape=shape, dtype=dtype, device=device, layout="any"), label="x")
    w = data.draw(gst.tensors(shape=shape, dtype=dtype, device=device), label="w")
    m = data.draw(gst.tensors(shape=(k, k), dtype=dtype, device=device, min_value=-1, max_value=1))
    report = check_gradients(fn, x, w, m, mode=mode, seed=0)
    assert report.margin < 1.0
