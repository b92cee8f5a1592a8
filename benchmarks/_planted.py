"""Planted bugs: small ``torch.autograd.Function`` examples, each wrong in one way a gradient
checker must catch, each with its correct twin.

Shared by the tests of :mod:`gradlab.testing` (``tests/testing/test_planted_bugs.py``) and the
``checking`` benchmark suite (which sets every case against
``torch.autograd.gradcheck``/``gradgradcheck``); kept outside the installed package since no user
of gradlab needs them. ``CASES`` maps a name to a
:class:`Case`; ``case.make(bad)`` returns ``(fn, inputs)``, the inputs to differentiate already
having ``requires_grad=True`` so that both gradlab and torch's checkers take them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CASES", "Case", "caught_by_gradlab", "caught_by_torch", "tanh_affine", "tanh_problem"]

F64 = torch.float64
Made = tuple[Callable[..., Any], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Case:
    """One bug class: ``make(bad)`` builds the wrong (``True``) or correct (``False``) version."""

    name: str
    item: str  # what it is about, as a short phrase
    make: Callable[[bool], Made]
    order: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # check_gradients keywords
    torch_options: dict[str, Any] = field(default_factory=dict)  # gradcheck keywords
    match: str = ""  # regular expression gradlab's message must match


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 1: layout


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _layout(bad: bool) -> Made:
    """``x**2``; the bad backward reads the saved input as if it were contiguous."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            if bad:  # wrong unless x is contiguous
                x = x.as_strided(x.shape, _contiguous_strides(x.shape), x.storage_offset())
            return 2 * g * x

    base = torch.randn(4, 6, dtype=F64, generator=_gen(1))
    x = base[:, ::2].detach().requires_grad_(True)  # (4, 3) with gaps: a strided slice
    return Square.apply, (x,)


# ----------------------------------------------------------------------------- 2: None grads


def _undefined(bad: bool) -> Made:
    """``(2 x, sin x)`` under ``set_materialize_grads(False)``; the bad backward scales the
    first gradient wrongly when the second grad_output is ``None``."""

    class TwoOut(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):  # type: ignore[override]
            return 2 * x, x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g1, g2):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            gx = torch.zeros_like(x)
            if g1 is not None:
                gx = gx + 2 * g1 * (1.01 if bad and g2 is None else 1.0)
            if g2 is not None:
                gx = gx + g2 * x.cos()
            return gx

    return TwoOut.apply, (torch.randn(5, dtype=F64, generator=_gen(2)).requires_grad_(True),)


# ----------------------------------------------------------------------------- 3: order 2


def _double_backward(bad: bool) -> Made:
    """``x**3`` with a hand-written double backward; the bad one is wrong w.r.t. grad_output
    only (the derivative w.r.t. the input is right)."""

    class CubeGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, g):  # type: ignore[override]
            ctx.save_for_backward(x, g)
            return 3 * x**2 * g

        @staticmethod
        def backward(ctx, gg):  # type: ignore[override]
            x, g = ctx.saved_tensors
            return gg * 6 * x * g, gg * 3 * x**2 * (1.01 if bad else 1.0)

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return CubeGrad.apply(x, g)

    return Cube.apply, (torch.tensor([0.5, -1.5, 2.0], dtype=F64).requires_grad_(True),)


# ----------------------------------------------------------------------------- 4: forward AD


def _forward(bad: bool) -> Made:
    """``x**2`` whose backward is right; the bad jvp is 1 % too large."""

    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):  # type: ignore[override]
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return 2 * g * x

        @staticmethod
        def jvp(ctx, t):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return 2 * t * x * (1.01 if bad else 1.0)

    return Square.apply, (torch.randn(5, dtype=F64, generator=_gen(4)).requires_grad_(True),)


# ----------------------------------------------------------------------------- 5: contract


def _reentrant(bad: bool) -> Made:
    """``sin x`` whose bad backward has relative noise of 1e-9 from its own generator: below
    the gradient tolerance, so only a second run of the backward shows it."""
    noise = torch.Generator().manual_seed(5)

    class NoisySin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            gx = g * x.cos()
            if bad:
                gx = gx * (1 + 1e-9 * torch.rand(gx.shape, generator=noise, dtype=gx.dtype))
            return gx

    return NoisySin.apply, (torch.randn(5, dtype=F64, generator=_gen(5)).requires_grad_(True),)


def _scaling(bad: bool) -> Made:
    """``sum(x**2)`` (one scalar output); the bad backward ignores grad_output, which the
    Jacobian alone (cotangent 1) cannot see."""

    class SumSquares(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return (x * x).sum()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return 2 * x if bad else 2 * g * x

    return SumSquares.apply, (torch.randn(5, dtype=F64, generator=_gen(6)).requires_grad_(True),)


# ----------------------------------------------------------------------------- 6: what


def _integer_output(bad: bool) -> Made:
    """``max(x, dim=1)`` returning values and integer indices; the bad backward scales."""

    class Max(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            values, idx = x.max(dim=1)
            ctx.save_for_backward(idx)
            ctx.mark_non_differentiable(idx)
            ctx.shape = x.shape
            return values, idx

        @staticmethod
        def backward(ctx, g, _gidx):  # type: ignore[override]
            (idx,) = ctx.saved_tensors
            gx = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
            gx.scatter_(1, idx.unsqueeze(1), g.unsqueeze(1))
            return gx * (1.01 if bad else 1.0)

    x = torch.randn(3, 4, dtype=F64, generator=_gen(7)).requires_grad_(True)
    return Max.apply, (x,)


def _constant_input(bad: bool) -> Made:
    """``x[idx] * w`` with an integer index and a float weight that do not require grad (so
    are constants); the bad backward for ``x`` is off by 1 %."""

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, idx, w):  # type: ignore[override]
            ctx.save_for_backward(idx, w)
            ctx.n = x.shape[0]
            return x[idx] * w

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            idx, w = ctx.saved_tensors
            gx = torch.zeros(ctx.n, dtype=g.dtype, device=g.device).index_add(0, idx, g * w)
            # The weight's gradient is garbage: it is never asked for (w is a constant).
            return gx * (1.01 if bad else 1.0), None, torch.full_like(w, 7.0)

    x = torch.randn(6, dtype=F64, generator=_gen(8)).requires_grad_(True)
    idx = torch.tensor([4, 0, 4, 2])
    w = torch.randn(4, dtype=F64, generator=_gen(9))
    return Gather.apply, (x, idx, w)


# ----------------------------------------------------------------------------- 7: vmap rule


def _vmap_rule(bad: bool) -> Made:
    """``A @ x`` with a hand-written vmap rule; the bad rule forgets a transpose."""
    A = torch.randn(4, 4, dtype=F64, generator=_gen(10))

    class MatVec(torch.autograd.Function):
        @staticmethod
        def forward(x):  # type: ignore[override]
            return A @ x

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            pass

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g @ A

        @staticmethod
        def vmap(info, in_dims, x):  # type: ignore[override]
            x = x.movedim(in_dims[0], 0)
            return (x @ A if bad else x @ A.T), 0

    return MatVec.apply, (torch.randn(4, dtype=F64, generator=_gen(11)).requires_grad_(True),)


# ----------------------------------------------------------------------------- 8: complex


def _complex(bad: bool) -> Made:
    """``c * z`` for complex ``c``; the bad backward forgets the conjugate (g * c instead of
    g * conj(c), PyTorch's convention)."""
    c = torch.tensor(0.6 - 1.3j, dtype=torch.complex128)

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):  # type: ignore[override]
            return c * z

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g * (c if bad else c.conj())

    z = torch.randn(3, dtype=torch.complex128, generator=_gen(12)).requires_grad_(True)
    return Scale.apply, (z,)


# ----------------------------------------------------------------------------- 9: classic


def tanh_affine(
    A: torch.Tensor,
    *,
    style: str = "new",
    wrong: tuple[int, int] | None = None,
    delta: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> tanh(A @ x)`` as a custom ``autograd.Function`` whose backward adds ``delta`` to
    Jacobian entry ``wrong = (i, j)`` (none when ``wrong`` is None).

    The wrong vjp is ``J^T g + delta * g[i] * e_j``, i.e. the Jacobian ``J + delta e_i e_j^T``.
    ``style="old"``: ctx in forward (cannot be vmapped); ``"new"``: setup_context + vmap rule.
    The one definition of this function: the ``checking`` suite's power table, the classic
    planted bug below and the tests of :mod:`gradlab.testing` use it.
    """
    n = A.shape[1]
    onehot = torch.zeros(n, dtype=A.dtype, device=A.device)
    i, j = wrong if wrong is not None else (0, 0)
    onehot[j] = 1.0

    def vjp(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gx = (g * (1 - y * y)) @ A
        return gx + delta * g[..., i : i + 1] * onehot if wrong is not None else gx

    if style == "old":

        class Old(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):  # type: ignore[override]
                y = torch.tanh(A @ x)
                ctx.save_for_backward(y)
                return y

            @staticmethod
            def backward(ctx, g):  # type: ignore[override]
                (y,) = ctx.saved_tensors
                return vjp(y, g)

        return Old.apply

    class New(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):  # type: ignore[override]
            return torch.tanh(A @ x)

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (y,) = ctx.saved_tensors
            return vjp(y, g)

    return New.apply


def tanh_problem(
    n: int, dtype: torch.dtype = F64, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-scaled ``A`` (entries ~ 1/sqrt(n)) and ``x`` for :func:`tanh_affine` (seeded by n)."""
    gen = _gen(n)
    A = torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
    x = torch.randn(n, generator=gen, dtype=F64)
    return A.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)


def _one_entry(bad: bool) -> Made:
    """``tanh(A @ x)`` (n = 64) whose backward is off by 1e-3 in Jacobian entry (21, 42)."""
    n = 64
    A = torch.randn(n, n, dtype=F64, generator=_gen(n)) / n**0.5
    fn = tanh_affine(A, wrong=(21, 42) if bad else None, delta=1e-3)
    x = torch.randn(n, dtype=F64, generator=_gen(n + 1)).requires_grad_(True)
    return fn, (x,)


# ----------------------------------------------------------------------------- 10: in place


def _grad_output_in_place(bad: bool) -> Made:
    """``sin x`` whose bad backward writes into grad_output (``g.mul_(cos x)``): the returned
    numbers are right, but the caller's cotangent is overwritten."""

    class SinInPlaceGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return g.mul_(torch.cos(x)) if bad else g * torch.cos(x)

    return SinInPlaceGrad.apply, (
        torch.randn(5, dtype=F64, generator=_gen(13)).requires_grad_(True),
    )


def _input_in_place(bad: bool) -> Made:
    """``2 x`` whose bad forward doubles its input in place without ``ctx.mark_dirty``."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            return x.mul_(2.0) if bad else x * 2.0

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return 2.0 * g

    return Double.apply, (torch.randn(5, dtype=F64, generator=_gen(14)).requires_grad_(True),)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("layout", "1 inputs as given (a strided slice)", _layout, match=r"wrong derivative"),
        Case(
            "undefined grad_output",
            "2 undefined (None) grad_outputs",
            _undefined,
            match=r"undefined \(None\)",
        ),
        Case(
            "double backward w.r.t. grad_output",
            "3 order=2 is gradgradcheck",
            _double_backward,
            order=2,
            match=r"wrong second derivative .* / d grad_output 0",
        ),
        Case(
            "forward mode (jvp)",
            "4 forward mode",
            _forward,
            options={"forward_ad": True},
            torch_options={"check_forward_ad": True},
            match=r"wrong forward-mode \(jvp\)",
        ),
        Case("not reentrant", "5 reentrancy", _reentrant, match=r"not reentrant"),
        Case(
            "ignores grad_output",
            "5 grad_output scaling",
            _scaling,
            match=r"not multiplied by grad_output",
        ),
        Case(
            "integer output",
            "6 integer outputs skipped",
            _integer_output,
            match=r"wrong derivative d output 0",
        ),
        Case(
            "constant inputs",
            "6 only inputs requiring grad",
            _constant_input,
            match=r"wrong derivative d output 0\[\d\] / d input 0",
        ),
        Case("vmap rule", "7 custom vmap rule", _vmap_rule, match=r"vmap rule of fn is wrong"),
        Case(
            "complex conjugate",
            "8 complex (Wirtinger)",
            _complex,
            match=r"wrong derivative d output 0\[\d, \d\] / d input 0\[\d, \d\]",
        ),
        Case(
            "grad_output in place",
            "10 backward writes into grad_output",
            _grad_output_in_place,
            match=r"modified its grad_output in place .* was -?2 before the backward",
        ),
        Case(
            "input in place",
            "10 forward writes into its input",
            _input_in_place,
            match=r"fn modified its input 0 in place: flat element 0 was .*mark_dirty",
        ),
        Case(
            "one entry off by 1e-3",
            "9 one Jacobian entry",
            _one_entry,
            match=r"d output 0\[21\] / d input 0\[42\]",
        ),
    )
}


def caught_by_gradlab(case: Case, bad: bool, mode: str, **options: Any) -> bool:
    """Whether ``check_gradients`` raises :class:`GradientCheckError` on the case."""
    from gradlab.testing import GradientCheckError, check_gradients

    fn, inputs = case.make(bad)
    try:
        opts: dict[str, Any] = {"order": case.order, "mode": mode, **case.options, **options}
        check_gradients(fn, *inputs, **opts)
    except GradientCheckError:
        return True
    return False


def caught_by_torch(case: Case, bad: bool, checker: str) -> str:
    """``"yes"``/``"no"``: whether torch's ``checker`` (``"gradcheck"``, ``"gradcheck fast"``,
    ``"gradgradcheck"``) rejects the case; ``"error"`` if it raised something else."""
    fn, inputs = case.make(bad)
    opts = dict(case.torch_options)
    try:
        if checker == "gradgradcheck":
            opts.pop("check_forward_ad", None)
            ok = torch.autograd.gradgradcheck(fn, inputs, raise_exception=False, **opts)
        else:
            ok = torch.autograd.gradcheck(
                fn, inputs, fast_mode=checker == "gradcheck fast", raise_exception=False, **opts
            )
    except Exception:
        return "error"
    return "no" if ok else "yes"
