"""Tests of gradlab.testing.check_gradients (gradlab/testing/check.py)."""

from __future__ import annotations

import pytest
import torch

import gradlab
from benchmarks._planted import tanh_affine
from benchmarks._planted import tanh_problem as problem
from gradlab.testing import (
    GradientCheckError,
    GradientCheckReport,
    Location,
    NonDifferentiablePointError,
    _analytical,
    _fast,
    check_gradients,
    numerical_jacobian,
)

MODES = ["full", "fast"]
STYLES = ["old", "new"]


# ----------------------------------------------------------------------------- Done means


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [16, 128, 512])
def test_catches_one_entry_wrong_by_1e_3(n: int, mode: str, style: str, device) -> None:
    A, x = problem(n, device=device)
    i, j = n // 3, (2 * n) // 3
    fn = tanh_affine(A, style=style, wrong=(i, j), delta=1e-3)
    with pytest.raises(GradientCheckError, match=rf"d output 0\[{i}\] / d input 0\[{j}\]") as err:
        check_gradients(fn, x, mode=mode)
    e = err.value
    assert e.location == Location(0, 0, (i,), (j,))
    assert e.analytical - e.numerical == pytest.approx(1e-3, rel=1e-3)
    assert e.mismatches == 1
    assert "tolerance" in str(e) and "analytical value" in str(e)


@pytest.mark.parametrize("n", [16, 128, 512])
def test_fast_probes_alone_catch_1e_3(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the localising full comparison, the random signed probes must see the error.
    monkeypatch.setattr(_fast, "_LOCALIZE_LIMIT", 0)
    A, x = problem(n)
    fn = tanh_affine(A, style="new", wrong=(1, n - 2), delta=1e-3)
    for seed in range(3):
        with pytest.raises(GradientCheckError, match="along random signed directions") as err:
            check_gradients(fn, x, mode="fast", seed=seed)
        assert err.value.location == Location(0, 0, None, None)
        # Rademacher directions: u^T E w = +-1e-3 * w_j exactly in every probe, where the
        # direction w = v * max(1, |x|) is scaled like the finite-difference steps.
        seen = 1e-3 * max(1.0, abs(float(x[n - 2])))
        assert abs(err.value.analytical - err.value.numerical) == pytest.approx(seen, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [16, 128, 512])
def test_correct_function_passes(n: int, mode: str, style: str, dtype, device) -> None:
    A, x = problem(n, dtype=dtype, device=device)
    report = check_gradients(tanh_affine(A, style=style), x, mode=mode)
    assert isinstance(report, GradientCheckReport)
    assert report.margin < 1.0 and report.mode == mode and report.order == 1
    assert report.compared == (n * n if mode == "full" else report.probes)
    assert (report.atol, report.rtol) == ((1e-7, 1e-5) if dtype == torch.float64 else (1e-3, 1e-2))


def test_fast_catches_planted_1_0_error_that_torch_fast_gradcheck_is_said_to_miss() -> None:
    A, x = problem(128)
    fn = tanh_affine(A, style="new", wrong=(5, 77), delta=1.0)
    with pytest.raises(GradientCheckError, match=r"output 0\[5\] / d input 0\[77\]"):
        check_gradients(fn, x, mode="fast")


def test_gaussian_directions_catch_a_planted_error() -> None:
    A, x = problem(64)
    fn = tanh_affine(A, style="new", wrong=(3, 4), delta=1e-2)
    with pytest.raises(GradientCheckError, match=r"output 0\[3\] / d input 0\[4\]"):
        check_gradients(fn, x, mode="fast", directions="gaussian", seed=0)
    check_gradients(tanh_affine(A, style="new"), x, mode="fast", directions="gaussian", seed=0)


def test_report_fields_against_a_direct_computation() -> None:
    A, x = problem(8)
    fn = lambda v: torch.tanh(A @ v)
    report = check_gradients(fn, x, method="richardson")
    jac = torch.func.jacrev(fn)(x)
    assert report.max_abs_error < 1e-9 and report.method == "richardson"
    assert report.eps == (1e-3,) and report.probes == 0 and isinstance(report.seed, int)
    assert report.worst is not None and report.worst.output == 0
    assert report.compared == jac.numel()
    assert "gradients OK" in str(report)


def _direct_comparison(fn, x: torch.Tensor, method: str = "central"):
    """The full comparison written out: jacrev against numerical_jacobian, element by element."""
    f0 = fn(x)
    m, n = f0.numel(), x.numel()
    ana = torch.func.jacrev(fn)(x).reshape(m, n)
    ((num,),) = numerical_jacobian(fn, x, method=method)
    atol, rtol = 1e-7, 1e-5
    eps = 5e-6 if method == "central" else 1e-3
    factor = 4.0 if method == "central" else 12.0
    step = eps * x.reshape(-1).abs().clamp(min=1.0)
    noise = factor * torch.finfo(x.dtype).eps * f0.reshape(-1, 1).abs() / step.reshape(1, -1)
    diff = (ana - num).abs()
    tol = atol + rtol * num.abs() + noise
    big = num.abs() > atol
    return diff, tol, (diff[big] / num.abs()[big]).max(), noise


@pytest.mark.parametrize("method", ["central", "richardson"])
def test_report_maxima_and_worst_entry_match_the_written_out_comparison(method: str) -> None:
    # Non-square Jacobian with multi-dimensional input and output: the vectorised comparison
    # must report the same maxima and locate the worst entry at the right multi-indices.
    #
    # The analytical Jacobian carries a planted error P (a gradient-only term: its value is an
    # exact 0.0, so finite differences cannot see it) of a known size below the tolerance, so the
    # check passes and every compared difference is P plus rounding noise. Without P the
    # differences are rounding noise alone, whose maxima and argmax change with the CPU's
    # vector width (AVX-512 vs AVX2 vs plain C++ kernels): comparing them tightly fails on some
    # machines. The agreement allowed below is that noise, bounded by the checker's own
    # rounding model (the `noise` term of the tolerance), never a fixed relative figure.
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(12, 10, generator=gen, dtype=torch.float64) / 3
    x = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    clean = lambda v: torch.tanh(W @ v.reshape(-1)).reshape(3, 4) * 1e3
    J = torch.func.jacrev(clean)(x).reshape(12, 10)
    # A fraction u of each entry's atol + rtol * |J| (the checker's tolerance without its noise
    # term), u in [0.1, 0.5] except 0.8 at the largest |J|: the worst entry is known in advance.
    u = 0.1 + 0.4 * torch.rand(12, 10, generator=gen, dtype=torch.float64)
    worst_r, worst_c = divmod(int(J.abs().argmax()), 10)
    u[worst_r, worst_c] = 0.8
    P = u * (1e-7 + 1e-5 * J.abs())

    def fn(v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(-1)
        planted = P @ flat - (P @ flat).detach()  # value exactly 0, gradient P
        return clean(v) + planted.reshape(3, 4)

    report = check_gradients(fn, x, method=method)
    # noise: what rounding may add to any one difference (the checker's rounding allowance)
    diff, tol, max_rel, noise = _direct_comparison(fn, x, method)
    assert float(noise.max()) < 1e-3 * float(P.max())  # the maxima are the planted error's
    assert report.compared == diff.numel()
    assert abs(report.max_abs_error - float(diff.max())) <= 2 * float(noise.max())
    assert report.max_abs_error == pytest.approx(float(P.max()), abs=float(noise.max()))
    big = J.abs() > 1e-7
    rel_noise = float((noise / J.abs().clamp(min=1e-7))[big].max())
    assert abs(report.max_rel_error - float(max_rel)) <= 2 * rel_noise
    assert abs(report.margin - float((diff / tol).max())) <= 2 * float((noise / tol).max())
    worst = report.worst
    assert (
        worst is not None and worst.output_element is not None and worst.input_element is not None
    )
    r = worst.output_element[0] * 4 + worst.output_element[1]
    c = worst.input_element[0] * 5 + worst.input_element[1]
    assert (r, c) == (worst_r, worst_c)


@pytest.mark.parametrize("method", ["central", "richardson"])
def test_chunked_evaluation_gives_the_same_verdict(method: str, monkeypatch) -> None:
    # Tiny batch budgets split the finite-difference columns and the identity basis into many
    # chunks: the verdict and the location of a planted error must not depend on the chunking.
    from gradlab.testing import numerical as numerical_module

    n = 40
    A, x = problem(n)
    fn = tanh_affine(A, style="new")
    whole = check_gradients(fn, x, method=method)
    monkeypatch.setattr(numerical_module, "_BATCH_BUDGET", 7 * 2 * n)  # a few columns per chunk
    monkeypatch.setattr(_analytical, "_ROWS_BUDGET", 6 * 2 * n)  # 6 basis rows per chunk
    chunked = check_gradients(fn, x, method=method)
    assert chunked.compared == whole.compared == n * n
    # Batches of other sizes round differently in the last bits (GEMM blocking), so the
    # errors agree in size, not bit for bit; a misplaced chunk would give errors of order 1.
    assert chunked.margin < 1 and whole.margin < 1
    assert chunked.max_abs_error < 1e-9 and whole.max_abs_error < 1e-9
    i, j = 33, 37  # in the last chunk of rows and of columns
    bad = tanh_affine(A, style="new", wrong=(i, j), delta=1e-3)
    with pytest.raises(GradientCheckError, match=rf"d output 0\[{i}\] / d input 0\[{j}\]"):
        check_gradients(bad, x, method=method)


# ----------------------------------------------------------------------------- several tensors


def test_several_inputs_and_outputs_name_the_right_pair(device) -> None:
    x = torch.randn(3, 2, dtype=torch.float64, device=device)
    y = torch.randn(2, dtype=torch.float64, device=device)

    class WrongInSecond(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            gb = (g * a).sum(0)
            return g * b, gb + 1e-2 * (torch.arange(2, device=gb.device) == 1) * g[2, 1]

    def fn(a, b):
        return (a.sin().sum(), WrongInSecond.apply(a, b))

    report = check_gradients(lambda a, b: (a.sin().sum(), a * b), x, y)
    assert report.compared == 1 * 6 + 1 * 2 + 6 * 6 + 6 * 2
    with pytest.raises(GradientCheckError, match=r"d output 1\[2, 1\] / d input 1\[1\]") as err:
        check_gradients(fn, x, y)
    assert err.value.location == Location(1, 1, (2, 1), (1,))


def test_non_contiguous_inputs(device) -> None:
    base = torch.randn(4, 6, dtype=torch.float64, device=device)
    x = base.T[:, ::2]  # (6, 2) view, not contiguous
    assert not x.is_contiguous()
    seen = []

    def fn(a):
        seen.append(a.is_contiguous())
        return a.exp() @ torch.ones(2, dtype=a.dtype, device=a.device)

    assert check_gradients(fn, x).margin < 1
    assert seen[0] is False  # fn saw the caller's layout


def test_inputs_are_left_untouched() -> None:
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64)
    x_before, w_before = x.detach().clone(), w.clone()
    check_gradients(lambda a, b: (a * b).tanh(), x, w, order=2)
    check_gradients(lambda a, b: (a * b).tanh(), x, w, mode="fast")
    assert x.requires_grad and not w.requires_grad
    assert x.grad is None and w.grad is None
    assert torch.equal(x.detach(), x_before) and torch.equal(w, w_before)


def test_works_under_no_grad() -> None:
    x = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        report = check_gradients(torch.sin, x, order=2)
    assert report.order == 2 and report.first_order is not None


def test_output_independent_of_input_has_zero_jacobian() -> None:
    x = torch.randn(3, dtype=torch.float64)
    c = torch.ones(2, dtype=torch.float64)
    assert check_gradients(lambda a: (a.sum(), c * 2), x).max_abs_error < 1e-9


# ----------------------------------------------------------------------------- order 2


class _Cube(torch.autograd.Function):
    """x**3 whose first derivative is right and whose second is right unless ``delta``."""

    delta = 0.0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


class _CubeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        return gg * 6 * x * g * (1 + _Cube.delta), gg * 3 * x**2


@pytest.mark.parametrize("mode", MODES)
def test_order_2_catches_a_wrong_double_backward(mode: str, monkeypatch) -> None:
    x = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    report = check_gradients(_Cube.apply, x, order=2, mode=mode)
    assert report.order == 2 and report.first_order is not None
    assert report.first_order.order == 1
    monkeypatch.setattr(_Cube, "delta", 1e-3)
    assert check_gradients(_Cube.apply, x, order=1, mode=mode).order == 1  # first order fine
    with pytest.raises(GradientCheckError, match=r"wrong second derivative d grad\[input 0\]\[2\]"):
        check_gradients(_Cube.apply, x, order=2, mode=mode)


def test_order_2_of_a_once_differentiable_function_is_wrong() -> None:
    # once_differentiable makes the double backward silently zero: a wrong second derivative.
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    x = torch.randn(3, dtype=torch.float64)
    assert check_gradients(Once.apply, x).order == 1
    with pytest.raises(GradientCheckError, match=r"wrong second derivative .* analytical value 0 "):
        check_gradients(Once.apply, x, order=2)


def test_order_2_when_double_backward_fails_is_a_graph_error() -> None:
    class NoDouble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise NotImplementedError("no double backward here")

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return NoDouble.apply(g * x)

    x = torch.randn(3, dtype=torch.float64)
    assert check_gradients(Twice.apply, x).order == 1
    with pytest.raises(
        gradlab.GraphError, match=r"order=2 needs fn's backward.*no double backward"
    ):
        check_gradients(Twice.apply, x, order=2)


# ----------------------------------------------------------------------------- kinks


def test_relu_at_zero_is_a_non_differentiable_point(device) -> None:
    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, device=device)
    with pytest.raises(NonDifferentiablePointError, match="non-differentiable") as err:
        check_gradients(torch.relu, x)
    assert err.value.kinks == (Location(0, 0, (0,), (0,)),)
    assert not isinstance(err.value, GradientCheckError)
    report = check_gradients(torch.relu, x, kinks="skip")
    assert report.kinks == (Location(0, 0, (0,), (0,)),) and report.compared == 8
    with pytest.raises(NonDifferentiablePointError):
        check_gradients(torch.relu, x, mode="fast")


@pytest.mark.parametrize(
    ("fn", "x"),
    [
        (torch.abs, [1e-9, 1.0]),
        (lambda v: v.max(0).values, [1.0, 1.0, -1.0]),
    ],
    ids=["abs-near-0", "max-ties"],
)
def test_other_kinks(fn, x) -> None:
    with pytest.raises(NonDifferentiablePointError):
        check_gradients(fn, torch.tensor(x, dtype=torch.float64))


def test_tie_with_averaged_gradient_passes() -> None:
    # torch.maximum splits the gradient 0.5/0.5 at a tie: equal to the central difference.
    v = torch.tensor([0.3, 0.3], dtype=torch.float64)
    assert check_gradients(lambda a: torch.maximum(a[0], a[1]), v).margin < 1


def test_wrong_gradient_at_a_kink_is_not_blamed_on_the_kink() -> None:
    class BadRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.where(x > 0, 1.0, 5.0).to(g.dtype)  # 5 left of and at 0

    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    with pytest.raises(GradientCheckError, match=r"d output 0\[2\] / d input 0\[2\]") as err:
        check_gradients(BadRelu.apply, x)
    assert err.value.mismatches == 2  # at 0 and at -2
    assert err.value.location == Location(0, 0, (2,), (2,))  # the larger error, at -2


def test_wrong_gradient_of_a_curved_function_is_not_a_kink() -> None:
    # exp(5x) at 1: one-sided differences at eps=1e-4 straddle the analytical value, but their
    # gap shrinks with the step (curvature), so this is a wrong gradient, not a kink.
    class BadExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.exp(5 * x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * 5 * y + 0.03

    x = torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(GradientCheckError):
        check_gradients(BadExp.apply, x, eps=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_non_tensor_input() -> None:
    with pytest.raises(
        TypeError,
        match=r"check_gradients: inputs\[1\] must be a torch.Tensor, got 2.0\..*functools.partial",
    ):
        check_gradients(lambda a, b: a * b, torch.ones(2, dtype=torch.float64), 2.0)


def test_integer_input() -> None:
    with pytest.raises(
        TypeError, match=r"inputs\[0\] must be a floating tensor.*dtype=torch.int64.*double"
    ):
        check_gradients(torch.sin, torch.arange(3))


def test_half_input() -> None:
    with pytest.raises(
        TypeError, match=r"inputs\[0\] must be float32/float64.*dtype=torch.float16.*x.double\(\)"
    ):
        check_gradients(torch.sin, torch.ones(2, dtype=torch.float16))


def test_fn_returning_a_non_tensor() -> None:
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(
        TypeError,
        match=r"check_gradients: fn's return value must be a tensor or a tuple of tensors, got 2.0",
    ):
        check_gradients(lambda a: float(a.sum()), x)
    with pytest.raises(
        TypeError, match=r"output 1 of fn must be a tensor or a tuple of tensors, got 3\."
    ):
        check_gradients(lambda a: (a, 3), x)
    with pytest.raises(
        TypeError, match=r"output 0 of fn must be a floating tensor.*dtype=torch.int64"
    ):
        check_gradients(lambda a: a.argmax(), x)
    with pytest.raises(
        TypeError,
        match=r"fn's return value must be a tensor or a non-empty tuple of tensors, got \(\)",
    ):
        check_gradients(lambda a: (), x)


def test_inputs_on_different_devices() -> None:
    a = torch.ones(2, dtype=torch.float64)
    b = torch.ones(2, dtype=torch.float64, device="meta")
    with pytest.raises(
        ValueError, match=r"inputs must be on one device, got input 0: cpu, input 1: meta"
    ):
        check_gradients(lambda u, v: u * v, a, b)


def test_no_inputs_and_non_callable() -> None:
    with pytest.raises(
        TypeError,
        match=r"inputs must be one or more tensors, got \(\)\. Call check_gradients\(fn, x, ...\)",
    ):
        check_gradients(torch.sin)
    with pytest.raises(TypeError, match="fn must be a callable"):
        check_gradients(torch.ones(2), torch.ones(2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": 3}, "order must be one of 1, 2, got 3"),
        ({"mode": "quick"}, "mode must be one of 'full', 'fast', got 'quick'"),
        ({"method": "forward"}, "method must be one of 'central', 'richardson'"),
        ({"directions": "uniform"}, "directions must be one of"),
        ({"kinks": "ignore"}, "kinks must be one of 'raise', 'skip'"),
        ({"probes": 0}, "probes must be an int >= 1, got 0"),
        ({"eps": -1e-3}, "eps must be a finite number > 0, got -0.001"),
        ({"atol": float("nan")}, "atol must be a finite number >= 0"),
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
    ],
)
def test_bad_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_gradients(torch.sin, torch.ones(2, dtype=torch.float64), **kwargs)


def test_bad_seed() -> None:
    with pytest.raises(
        TypeError, match=r"seed must be an int, got '0'\. Pass an int seed, or None"
    ):
        check_gradients(torch.sin, torch.ones(2, dtype=torch.float64), seed="0")  # type: ignore[arg-type]
