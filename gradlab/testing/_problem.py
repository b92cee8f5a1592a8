"""What check_gradients differentiates, as a real function of real tensors.

* **Inputs.** When at least one input has ``requires_grad=True``, exactly those are
  differentiated and the others are constants (``torch.autograd.gradcheck``'s rule); when none
  does, every floating (or complex) input is. Constants may have any dtype and layout.
* **Outputs.** Integer and bool outputs (e.g. the indices of ``torch.max(x, dim)``) are skipped.
* **Layout.** ``fn`` gets copies of the caller's tensors with the caller's sizes and strides
  (a strided slice, a transpose, an expanded view), so a backward that is wrong only for
  non-contiguous inputs is seen.
* **Complex numbers** (Wirtinger calculus, PyTorch's convention): a complex input ``z`` becomes
  the real tensor ``torch.view_as_real(z)`` (last dimension: real and imaginary part) and a
  complex output likewise. For a real loss ``L``, PyTorch's gradient w.r.t. ``z = x + iy`` is
  :math:`\\partial L/\\partial x + i\\,\\partial L/\\partial y` (twice the conjugate Wirtinger
  derivative :math:`\\partial L/\\partial \\bar z`), which is exactly the vjp of the real map
  ``view_as_real(fn(view_as_complex(.)))``: checking that real map checks fn's complex backward,
  the conjugate convention included, and covers what ``gradcheck`` checks with the real and
  imaginary parts of the grad_outputs.
* **Order 2** is ``gradgradcheck``'s problem: :math:`(x, v) \\mapsto J(x)^\\top v`, differentiated
  w.r.t. the inputs *and* the grad_outputs ``v`` (fixed random signs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import gradlab._validate as v
from gradlab.testing._analytical import Problem
from gradlab.testing._common import as_outputs, check_one_device, raw_outputs, same_layout
from gradlab.testing._report import CALLER
from gradlab.testing._sanity import (
    check_deterministic,
    check_finite_inputs,
    check_finite_outputs,
    check_full_memory,
    check_nonempty,
    check_unmodified,
)

__all__ = ["Prepared", "first_order", "prepare", "second_order"]

_DIFFERENTIABLE = (torch.float32, torch.float64, torch.complex64, torch.complex128)


@dataclass
class Prepared:
    """``fn`` as a real function of the differentiated inputs, and where things came from."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    xs: tuple[torch.Tensor, ...]  # real (views of) copies with the caller's strides
    f0: tuple[torch.Tensor, ...]  # real checked outputs at xs
    inputs: tuple[int, ...]  # fn's index of each differentiated input
    outputs: tuple[int, ...]  # fn's index of each checked output
    eval_seconds: float = 0.0  # one plain evaluation of fn at the point


def _select(inputs: Sequence[Any]) -> list[int]:
    if len(inputs) == 0:
        raise TypeError(
            v.message(CALLER, "inputs", "one or more tensors", inputs, f"Call {CALLER}(fn, x, ...)")
        )
    for k, x in enumerate(inputs):
        v.check_type(
            CALLER,
            f"inputs[{k}]",
            x,
            torch.Tensor,
            what="a torch.Tensor",
            fix="Every positional argument after fn is an input: bind non-tensor arguments with "
            "functools.partial or a lambda",
        )
    if any(x.requires_grad for x in inputs):
        diff = [k for k, x in enumerate(inputs) if x.requires_grad]
    else:
        diff = [k for k, x in enumerate(inputs) if x.is_floating_point() or x.is_complex()]
        if not diff:
            raise TypeError(
                v.message(
                    CALLER,
                    "inputs[0]",
                    "a floating tensor (no input is floating, and integer/bool tensors have no "
                    "gradient)",
                    inputs[0],
                    "Pass a float64 (or float32) tensor, e.g. x.double()",
                )
            )
    for k in diff:
        x = inputs[k]
        if x.layout != torch.strided:
            raise TypeError(
                v.message(
                    CALLER,
                    f"inputs[{k}]",
                    "a dense (strided) tensor to be differentiated",
                    x,
                    "Pass x.to_dense() (a sparse tensor can stay a constant if another input has "
                    "requires_grad=True)",
                )
            )
        if x.dtype not in _DIFFERENTIABLE:
            raise TypeError(
                v.message(
                    CALLER,
                    f"inputs[{k}]",
                    "float32/float64/complex64/complex128 (finite differences in half precision "
                    "cannot check gradients)",
                    x,
                    "Pass x.double() (or x.float())",
                )
            )
    check_one_device(inputs, CALLER)
    return diff


def _raw_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return raw_outputs(out, CALLER)


def prepare(
    fn: Callable[..., Any], inputs: Sequence[Any], mode: str = "full", nondet_tol: float = 0.0
) -> Prepared:
    """Validate the inputs, copy them (caller's layout) and build the real function to check.

    Before anything is differentiated, :mod:`gradlab.testing._sanity` checks the point (finite,
    not empty, fits in memory for ``mode="full"``) and ``fn`` itself (leaves its inputs alone,
    gives the same outputs twice)."""
    diff = _select(inputs)
    check_finite_inputs(inputs, diff)
    copies = [same_layout(x) if x.layout == torch.strided else x.detach().clone() for x in inputs]
    cplx = {k: inputs[k].is_complex() for k in diff}
    raw = _raw_outputs(fn(*copies))
    check_unmodified(inputs, copies)
    outputs = tuple(k for k, o in enumerate(raw) if o.is_floating_point() or o.is_complex())
    if not outputs:
        raise TypeError(
            v.message(
                CALLER,
                "output 0 of fn",
                "a floating tensor (no output is floating, and integer/bool outputs have no "
                "gradient)",
                raw[0],
                "Return the differentiable (floating) outputs",
            )
        )
    out_cplx = [raw[i].is_complex() for i in outputs]
    checked = [raw[i] for i in outputs]
    check_nonempty(inputs, diff, checked)
    check_finite_outputs(checked, outputs)
    check_full_memory(mode, [inputs[k] for k in diff], checked, diff)
    eval_seconds = check_deterministic(fn, copies, raw, _raw_outputs, nondet_tol)

    def real_fn(*d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(copies)
        for k, t in zip(diff, d):
            args[k] = torch.view_as_complex(t) if cplx[k] else t
        outs = _raw_outputs(fn(*args))
        return tuple(
            torch.view_as_real(outs[i]) if c else outs[i] for i, c in zip(outputs, out_cplx)
        )

    xs = tuple(torch.view_as_real(copies[k]) if cplx[k] else copies[k] for k in diff)
    f0 = tuple(
        (torch.view_as_real(raw[i]) if c else raw[i]).detach() for i, c in zip(outputs, out_cplx)
    )
    return Prepared(
        fn=real_fn,
        xs=xs,
        f0=f0,
        inputs=tuple(diff),
        outputs=outputs,
        eval_seconds=eval_seconds,
    )


def first_order(fn: Callable[..., Any]) -> Problem:
    return Problem(graph_fn=fn, num_fn=fn, loop_fn=fn)


def second_order(
    fn: Callable[..., Any], xs: tuple[torch.Tensor, ...], f0: tuple[torch.Tensor, ...], seed: int
) -> tuple[Problem, tuple[torch.Tensor, ...]]:
    """``(x, v) -> J(x)^T v`` (the gradient of ``<v, fn(x)>``) and the grad_outputs ``v``
    (random signs, fixed by ``seed``): the Jacobian of this map w.r.t. ``x`` and ``v`` is what
    ``gradgradcheck`` checks."""
    gen = torch.Generator().manual_seed(seed + 1)
    vs = tuple(
        (torch.randint(0, 2, tuple(o.shape), generator=gen) * 2 - 1).to(o.dtype).to(o.device)
        for o in f0
    )
    n = len(xs)

    def grad_of(
        xr: tuple[torch.Tensor, ...], vr: tuple[torch.Tensor, ...], create_graph: bool
    ) -> tuple[torch.Tensor, ...]:
        outs = as_outputs(fn(*xr), CALLER)
        pairs = [(o, v) for o, v in zip(outs, vr) if o.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(x) for x in xr)
        gs = torch.autograd.grad(
            [o for o, _ in pairs],
            xr,
            [v for _, v in pairs],
            create_graph=create_graph,
            allow_unused=True,
        )
        return tuple(g if g is not None else torch.zeros_like(x) for g, x in zip(gs, xr))

    def graph_fn(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad_of(a[:n], a[n:], True)

    def num_fn(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def outputs(*b: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return as_outputs(fn(*b), CALLER)

        vjp_fn = torch.func.vjp(outputs, *a[:n])[1]
        return tuple(vjp_fn(tuple(a[n:])))

    def loop_fn(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            xr = tuple(x.detach().requires_grad_(True) for x in a[:n])
            return tuple(g.detach() for g in grad_of(xr, a[n:], False))

    return Problem(graph_fn=graph_fn, num_fn=num_fn, loop_fn=loop_fn), vs
