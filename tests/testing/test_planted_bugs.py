"""Planted bugs (benchmarks/_planted.py): every bug class that gradcheck/gradgradcheck
catch, and the vmap rule that no anchor checks, caught by check_gradients in both modes; each
correct twin passes. For the classes gradcheck covers, torch's own checker on the very same
case is the reference for "this is a bug"."""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks._planted import CASES
from gradlab.testing import GradientCheckError, check_gradients

MODES = ["full", "fast"]
#: Cases whose bug torch.autograd.gradcheck (order 1) or gradgradcheck (order 2) rejects.
TORCH_REFERENCE = [
    "layout",
    "undefined grad_output",
    "double backward w.r.t. grad_output",
    "forward mode (jvp)",
    "not reentrant",
    "ignores grad_output",
    "integer output",
    "constant inputs",
    "complex conjugate",
]
#: The consistency check (report.checks) that each case exercises besides the Jacobian.
CHECKS = {
    "undefined grad_output": "undefined grad_outputs",
    "forward mode (jvp)": "forward mode",
    "not reentrant": "reentrant",
    "ignores grad_output": "grad_output scaling",
    "vmap rule": "vmap rule",
    "grad_output in place": "grad_output untouched",
}


def _torch_accepts(name: str, bad: bool) -> bool:
    case = CASES[name]
    fn, inputs = case.make(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.order == 2:
            return torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
        return torch.autograd.gradcheck(fn, inputs, raise_exception=False, **case.torch_options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_planted_bug_is_caught(name: str, mode: str) -> None:
    case = CASES[name]
    fn, inputs = case.make(True)
    with pytest.raises(GradientCheckError, match=case.match):
        check_gradients(fn, *inputs, order=case.order, mode=mode, **case.options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_correct_twin_passes(name: str, mode: str) -> None:
    case = CASES[name]
    fn, inputs = case.make(False)
    report = check_gradients(fn, *inputs, order=case.order, mode=mode, **case.options)
    assert report.margin < 1 and report.order == case.order
    if name in CHECKS:
        checks = report.first_order.checks if report.first_order else report.checks
        assert CHECKS[name] in checks


@pytest.mark.parametrize("name", TORCH_REFERENCE)
def test_torch_checkers_agree_these_are_bugs(name: str) -> None:
    assert not _torch_accepts(name, True)
    assert _torch_accepts(name, False)


def test_torch_gradcheck_does_not_see_a_wrong_vmap_rule() -> None:
    # The one class no anchor checks: gradcheck never vmaps the forward.
    assert _torch_accepts("vmap rule", True)


# ----------------------------------------------------------------------------- 1 layout


def test_layout_bug_needs_the_callers_layout() -> None:
    fn, (x,) = CASES["layout"].make(True)
    assert not x.is_contiguous()
    # The same backward is right for a contiguous input: only the caller's layout shows it.
    assert check_gradients(fn, x.detach().contiguous()).margin < 1
    with pytest.raises(GradientCheckError, match=r"wrong derivative d output 0\[\d, \d\]"):
        check_gradients(fn, x)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_sees_the_callers_strides(layout: str, mode: str) -> None:
    base = torch.randn(4, 6, dtype=torch.float64)
    x = {"transposed": base.T, "strided": base[:, ::2], "expanded": base[:1].expand(3, 6)}[layout]
    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a.sin()

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            seen.append((tuple(a.shape), a.stride()))
            return g * a.cos()

    before = (x.stride(), x.clone())
    assert check_gradients(Record.apply, x, mode=mode).margin < 1
    assert (tuple(x.shape), x.stride()) in seen
    assert x.stride() == before[0] and torch.equal(x, before[1])


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_forward_mode_and_order_2_with_the_callers_layout(layout: str) -> None:
    base = torch.randn(4, 6, dtype=torch.float64)
    x = {"transposed": base.T, "strided": base[:, ::2], "expanded": base[:1].expand(3, 6)}[layout]
    report = check_gradients(lambda a: (a.sin() * 2).cumsum(0), x, order=2, forward_ad=True)
    assert "forward mode" in report.checks and report.margin < 1


# ----------------------------------------------------------------------------- 2 undefined


def test_backward_failing_on_none_grad_output_is_named() -> None:
    class NoNone(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.set_materialize_grads(False)
            return x * 2, x * 3

        @staticmethod
        def backward(ctx, g1, g2):
            return 2 * g1 + 3 * g2  # TypeError when one is None

    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(
        GradientCheckError, match=r"backward fails when only output 0 has a grad_output.*None"
    ):
        check_gradients(NoNone.apply, x)


def test_undefined_check_runs_only_with_several_outputs() -> None:
    x = torch.randn(3, dtype=torch.float64)
    assert "undefined grad_outputs" not in check_gradients(torch.sin, x).checks
    report = check_gradients(lambda a: (a.sin(), a.cos()), x)
    assert "undefined grad_outputs" in report.checks


# ----------------------------------------------------------------------------- 3 order 2


@pytest.mark.parametrize("mode", MODES)
def test_order_2_names_the_grad_output(mode: str) -> None:
    fn, inputs = CASES["double backward w.r.t. grad_output"].make(True)
    assert check_gradients(fn, *inputs, mode=mode).order == 1  # first order is right
    with pytest.raises(GradientCheckError) as err:
        check_gradients(fn, *inputs, order=2, mode=mode)
    loc = err.value.location
    assert loc.order == 2 and loc.grad_output and loc.input == 0
    if mode == "full":
        assert loc.output_element == loc.input_element  # x**3 has a diagonal Jacobian


def test_order_2_compares_the_grad_output_columns() -> None:
    x = torch.randn(3, dtype=torch.float64)
    report = check_gradients(lambda a: (a.sin(), a * a), x, order=2)
    # Jacobian of (x, v1, v2) -> J^T v: 3 x (3 + 3 + 3) entries.
    assert report.compared == 3 * 9 and report.first_order is not None


# ----------------------------------------------------------------------------- 4 forward


def test_forward_mode_of_an_old_style_function() -> None:
    # No torch.func support (ctx in forward): the dual-number loop runs its jvp.
    class Old(torch.autograd.Function):
        bad = 1.0

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.x = x
            return x.exp()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.exp()

        @staticmethod
        def jvp(ctx, t):
            return t * ctx.x.exp() * Old.bad

    x = torch.randn(4, dtype=torch.float64)
    for mode in MODES:
        assert "forward mode" in check_gradients(Old.apply, x, mode=mode, forward_ad=True).checks
    Old.bad = 1.01
    assert check_gradients(Old.apply, x).order == 1  # reverse mode alone is right
    for mode in MODES:
        with pytest.raises(GradientCheckError, match=r"forward-mode \(jvp\)"):
            check_gradients(Old.apply, x, mode=mode, forward_ad=True)


def test_forward_mode_of_builtin_ops_and_order_2() -> None:
    A = torch.randn(5, 4, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    report = check_gradients(lambda v: torch.tanh(A @ v), x, order=2, forward_ad=True)
    assert "forward mode" in report.checks and "forward mode" in report.first_order.checks


def test_forward_ad_without_a_forward_rule_is_a_graph_error() -> None:
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    import gradlab

    x = torch.randn(3, dtype=torch.float64)
    assert check_gradients(NoJvp.apply, x).order == 1
    with pytest.raises(gradlab.GraphError, match=r"forward_ad=True needs forward-mode AD rules"):
        check_gradients(NoJvp.apply, x, forward_ad=True)


# ----------------------------------------------------------------------------- 5 contract


def test_nondet_tol_allows_a_small_nondeterminism() -> None:
    fn, inputs = CASES["not reentrant"].make(True)
    with pytest.raises(GradientCheckError, match=r"nondet_tol 0\b") as err:
        check_gradients(fn, *inputs)
    assert 0 < abs(err.value.analytical - err.value.numerical) <= 1e-8
    for mode in MODES:
        report = check_gradients(fn, *inputs, mode=mode, nondet_tol=1e-6)
        assert "reentrant" in report.checks
    # torch agrees on both sides of the tolerance
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=1e-6)


def test_backward_with_a_constant_offset_is_not_linear_in_grad_output() -> None:
    class Offset(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return (g + 1e-3).expand(3)  # right at g = 1 only

    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(GradientCheckError, match="not multiplied by grad_output") as err:
        check_gradients(Offset.apply, x)
    # vjp(-2u) = -2u + 1e-3 against -2u (1 + 1e-3) from the Jacobian: (1 + 2u) 1e-3, u = +-1
    diff = err.value.analytical - err.value.numerical
    assert diff == pytest.approx(3e-3) or diff == pytest.approx(-1e-3)


# ----------------------------------------------------------------------------- 6 what


def test_builtin_max_with_indices_is_checked_not_refused() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    report = check_gradients(lambda a: torch.max(a, dim=1), x)
    assert report.outputs == (0,) and report.compared == 3 * 12


def test_only_inputs_that_require_grad_are_differentiated() -> None:
    fn, (x, idx, w) = CASES["constant inputs"].make(False)
    report = check_gradients(fn, x, idx, w)
    assert report.inputs == (0,) and report.compared == 4 * 6
    assert x.requires_grad and not w.requires_grad  # left as they were
    # With no input requiring grad every floating input is differentiated: the garbage weight
    # gradient of this Function (never asked for above) is then caught (it is a constant, so
    # not multiplied by grad_output).
    with pytest.raises(GradientCheckError, match=r"not multiplied .* d output 0 / d input 2"):
        check_gradients(fn, x.detach(), idx, w)


def test_sparse_constant_is_allowed() -> None:
    S = torch.eye(3, dtype=torch.float64).to_sparse()
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    report = check_gradients(lambda a, s: torch.sparse.mm(s, a.unsqueeze(1)).squeeze(1), x, S)
    assert report.inputs == (0,)


# ----------------------------------------------------------------------------- 7 vmap rule


def test_vmap_rule_message_names_the_rule_not_kinks() -> None:
    fn, inputs = CASES["vmap rule"].make(True)
    with pytest.raises(GradientCheckError, match=r"vmap rule of fn is wrong.*vmap staticmethod"):
        check_gradients(fn, *inputs, kinks="skip")


# ----------------------------------------------------------------------------- 8 complex


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fn", "real_input"),
    [
        (torch.exp, False),
        (torch.abs, False),  # complex -> real
        (lambda z: z * z.conj(), False),
        (lambda z: (z.real * z.imag).sum(), False),
        (lambda x: torch.view_as_complex(x).exp(), True),  # real -> complex
    ],
    ids=["exp", "abs", "z*conj(z)", "re*im", "real-to-complex"],
)
def test_complex_builtins_pass(fn, real_input: bool, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    if real_input:
        arg = torch.randn(3, 2, dtype=torch.float64, generator=gen)
    else:
        arg = torch.randn(3, dtype=torch.complex128, generator=gen) + 0.5
    assert check_gradients(fn, arg, mode=mode).margin < 1


def test_complex_location_has_the_real_imaginary_index() -> None:
    fn, (z,) = CASES["complex conjugate"].make(True)
    with pytest.raises(GradientCheckError) as err:
        check_gradients(fn, z)
    loc = err.value.location
    assert len(loc.output_element) == 2 and loc.output_element[1] in (0, 1)
    assert len(loc.input_element) == 2 and loc.input_element[1] in (0, 1)
    # the conjugate bug is in the imaginary part of c: d Re(out) / d Im(z) or d Im / d Re
    assert loc.output_element[1] != loc.input_element[1]


# ----------------------------------------------------------------------------- bad input


def test_bad_nondet_tol_and_forward_ad() -> None:
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"check_gradients: nondet_tol must be a finite number "):
        check_gradients(torch.sin, x, nondet_tol=-1.0)
    with pytest.raises(TypeError, match=r"forward_ad must be True or False, got 1\. Pass forward"):
        check_gradients(torch.sin, x, forward_ad=1)  # type: ignore[arg-type]


def test_sparse_input_names_the_fix() -> None:
    x = torch.eye(2, dtype=torch.float64).to_sparse()
    with pytest.raises(
        TypeError,
        match=(
            r"inputs\[0\] must be a dense \(strided\) ten"
            r"sor.*layout=torch.sparse_coo.*x.to_dense\(\)"
        ),
    ):
        check_gradients(torch.sin, x)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_mode_with_looped_vjps_catches_the_same(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fast mode takes its probes' vjps in a loop when one vjp is slow (large matrices); force
    # that path here (the planted cases are small) and ask for the same verdicts.
    import gradlab.testing.check as check_module

    monkeypatch.setattr(check_module, "_LOOP_SECONDS", -1.0)
    case = CASES[name]
    fn, inputs = case.make(True)
    with pytest.raises(GradientCheckError, match=case.match):
        check_gradients(fn, *inputs, order=case.order, mode="fast", **case.options)
    fn, inputs = case.make(False)
    report = check_gradients(fn, *inputs, order=case.order, mode="fast", **case.options)
    assert report.margin < 1


def test_looped_and_vmapped_probe_vjps_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradlab.testing.check as check_module

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    x = torch.randn(5, dtype=torch.float64, generator=gen)
    fn = lambda v: torch.tanh(A @ v)
    vmapped = check_gradients(fn, x, mode="fast", seed=3)
    monkeypatch.setattr(check_module, "_LOOP_SECONDS", -1.0)
    looped = check_gradients(fn, x, mode="fast", seed=3)
    # same probes, same u^T J v up to rounding of a length-5 dot product
    assert looped.max_abs_error == pytest.approx(vmapped.max_abs_error, abs=1e-13)
    assert looped.compared == vmapped.compared
