"""check_gradients: autograd's derivatives against finite differences, vectorised.

Two modes compare the same thing at different cost:

``"full"``
    Every Jacobian entry. Autograd's Jacobian is one batched vector-Jacobian product over the
    identity basis per output (:mod:`gradlab.testing._analytical`); the finite differences are
    one vmapped batch per input (:func:`~gradlab.testing.numerical_jacobian`); the comparison is
    :mod:`gradlab.testing._compare`, with kinks told apart in :mod:`gradlab.testing._kinks`.
``"fast"``
    ``probes`` random *signed* direction pairs per output/input block
    (:mod:`gradlab.testing._fast`).

Both modes also run the contract checks of :mod:`gradlab.testing._contract` (reentrancy,
grad_output scaling, undefined grad_outputs) and :mod:`gradlab.testing._vmap_rule`, and with
``forward_ad=True`` forward mode (:mod:`gradlab.testing._forward`). What is differentiated
(inputs that require grad, skipped integer outputs, complex numbers, the order-2 map) is
:mod:`gradlab.testing._problem`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch

import gradlab._validate as v
from gradlab._errors import GraphError
from gradlab.testing._analytical import Analytic, Problem, analytical_jacobian
from gradlab.testing._common import (
    METHODS,
    check_fn,
    default_step,
    default_tolerances,
    least_precise,
    machine_eps,
)
from gradlab.testing._compare import check_block, fd_all
from gradlab.testing._contract import (
    UNDEFINED_PROBES,
    check_backward,
    check_undefined,
)
from gradlab.testing._errors import GradientCheckError, NonDifferentiablePointError
from gradlab.testing._fast import directions, fast
from gradlab.testing._forward import Forward
from gradlab.testing._problem import first_order, prepare, second_order
from gradlab.testing._report import CALLER, Acc, GradientCheckReport, Location, Settings
from gradlab.testing._vmap_rule import base_point_check
from gradlab.testing.numerical import Evaluator, steps_for

__all__ = ["GradientCheckReport", "Location", "check_gradients"]

#: Above this time for one plain evaluation of fn, fast mode takes its probes' vjps in a loop,
#: not vmapped (a loop iteration's own overhead is a few tens of microseconds).
_LOOP_SECONDS = 1e-4


def _compare(
    problem: Problem,
    xs: tuple[torch.Tensor, ...],
    st: Settings,
    f0: tuple[torch.Tensor, ...] | None = None,
) -> Acc:
    acc = Acc()
    ev = Evaluator(problem.num_fn, xs, CALLER, loop_fn=problem.loop_fn, f0=f0)
    unit = max(st.unit, machine_eps(least_precise(list(ev.f0) + list(xs))))
    ev.check_base = base_point_check(st, ev.f0, xs, unit)
    an = Analytic(problem, xs, ev.f0)
    steps = [
        steps_for(x, st.eps if st.eps is not None else default_step(st.method, x.dtype)) for x in xs
    ]
    gen = torch.Generator().manual_seed(st.seed)
    p = st.probes if st.mode == "fast" else UNDEFINED_PROBES
    us = [directions(p, tuple(o.shape), st, gen, o) for o in ev.f0]
    vs = [directions(p, (x.numel(),), st, gen, x) for x in xs] if st.mode == "fast" else []
    fwd = Forward(problem, xs, ev.f0) if st.forward_ad else None
    if st.mode == "full":
        analytical = [analytical_jacobian(an, i) for i in range(len(ev.f0))]
        # u^T J for the contract checks; they run before the comparison, so that a backward
        # that breaks them is named as such rather than as a wrong Jacobian entry.
        jtu = [[u.reshape(p, -1).to(a.dtype) @ a for a in analytical[i]] for i, u in enumerate(us)]
        check_backward(an, us, jtu, st)
        for j in range(len(xs)):
            numerical = fd_all(ev, j, steps[j], st.method)
            for i in range(len(ev.f0)):
                check_block(ev, i, j, analytical[i][j], numerical[i], steps[j], st, unit, acc)
            if fwd is not None:
                forward = fwd.jacobian(j)
                for i in range(len(ev.f0)):
                    check_block(
                        ev, i, j, forward[i], numerical[i], steps[j], st, unit, acc, forward=True
                    )
        if fwd is not None:
            st.ran("forward mode")
    else:
        # When one evaluation of fn (about one vjp) costs more than _LOOP_SECONDS it is
        # work-bound: a loop of p vjps costs p vjps plus negligible overhead, where vmap may be
        # several times slower. The probes go in as copies: a backward that writes into its
        # grad_output must not overwrite them (check_backward names that bug).
        loop = st.eval_seconds > _LOOP_SECONDS
        jtu = [
            an.looped_rows(i, u.clone()) if loop else an.rows(i, u.clone())
            for i, u in enumerate(us)
        ]
        check_backward(an, us, jtu, st)
        fast(ev, an, steps, st, unit, acc, us, vs, jtu, fwd)
    check_undefined(an, us, jtu, st)
    return acc


def check_gradients(
    fn: Callable[..., Any],
    *inputs: torch.Tensor,
    order: Literal[1, 2] = 1,
    mode: Literal["full", "fast"] = "full",
    atol: float | None = None,
    rtol: float | None = None,
    eps: float | None = None,
    method: Literal["central", "richardson"] = "central",
    probes: int = 16,
    directions: Literal["rademacher", "gaussian"] = "rademacher",
    seed: int | None = None,
    kinks: Literal["raise", "skip"] = "raise",
    forward_ad: bool = False,
    nondet_tol: float = 0.0,
) -> GradientCheckReport:
    r"""Check autograd's derivatives of ``fn`` at ``inputs`` against finite differences.

    ``order=1`` compares the Jacobian :math:`J = \partial f / \partial x` of every output
    w.r.t. every differentiated input. ``order=2`` first does that, then checks, like
    ``torch.autograd.gradgradcheck``, the derivatives of the backward itself: with fixed random
    signs :math:`v` per output (the grad_outputs) it compares the Jacobian of
    :math:`(x, v) \mapsto J(x)^\top v` w.r.t. :math:`x` *and* :math:`v`, computed by double
    backward (``create_graph=True``), with finite differences.

    An entry passes if :math:`|a - n| \le \mathrm{atol} + \mathrm{rtol}\,|n| + \rho`, ``a`` the
    analytical and ``n`` the numerical value and :math:`\rho = c\,u\,|f(x)|/h` the rounding
    noise of the difference quotient (``u`` the unit roundoff, ``h`` the step, ``c`` = 4 central,
    12 richardson). Default ``(atol, rtol)``: ``(1e-7, 1e-5)`` when everything is float64,
    ``(1e-3, 1e-2)`` when an input or output is float32. In ``"fast"`` mode each of ``probes``
    random signed direction pairs ``(u, v)`` per output/input block compares
    :math:`u^\top J v` with tolerance ``atol + rtol * ||J v||_2 + rho``; a single Jacobian entry
    wrong by ``d`` shows as exactly ``|d|`` in every Rademacher probe, so fast mode catches it
    whenever full mode would at tolerance ``atol + rtol * ||J||_F``. When a probe fails, the
    block is compared in full to name the worst element (blocks above 4M entries are reported
    by probe).

    What is differentiated: when at least one input has ``requires_grad=True``, exactly those
    inputs (the others are constants, of any dtype and layout: ``gradcheck``'s rule); when none
    does, every floating or complex input. Outputs with an integer or bool dtype (such as the
    indices of ``torch.max(x, dim)``) are skipped. ``fn`` is called on copies of the inputs with
    the caller's sizes and strides (a strided slice, a transpose or an expanded view stays one),
    so the backward sees the layout the caller gave; the finite differences may use dense
    copies. Complex inputs and outputs are checked with PyTorch's convention (Wirtinger
    calculus: the gradient of a real loss w.r.t. ``z = x + iy`` is
    :math:`\partial L/\partial x + i\,\partial L/\partial y`) as the real map on
    ``torch.view_as_real`` views; in locations the last index of a complex tensor is 0 for the
    real and 1 for the imaginary part.

    Before any derivative, ``fn`` and the point are checked (:mod:`gradlab.testing._sanity`): the
    differentiated inputs and ``fn``'s outputs are finite and not all empty; the first call of
    ``fn`` leaves its (copied) inputs unchanged (a forward that writes into an input, e.g. a
    custom Function without ``ctx.mark_dirty``); a second call at the same point gives the same
    outputs to ``nondet_tol`` (no state kept between calls, no dropout in training mode); and in
    ``"full"`` mode the dense Jacobian blocks fit in the device's free memory (else use
    ``"fast"``). Then one plain backward per output must leave its grad_output unchanged (a
    backward that writes into it, ``g.mul_(...)``, returns right numbers but overwrites the
    caller's cotangent) and return finite values.

    Besides the Jacobian, every call checks, on a few random cotangents (the probes of fast
    mode, 4 per output in full mode, so no second Jacobian is built):

    * the backward is reentrant: twice with the same inputs and grad_outputs it gives the same
      result to ``nondet_tol``;
    * the backward is multiplied by grad_output: :math:`\mathrm{vjp}(-2u) = -2\,\mathrm{vjp}(u)`
      and :math:`\mathrm{vjp}(0) = 0` (a scalar output's Jacobian alone cannot see a backward
      that ignores grad_output);
    * with several outputs, backpropagating through each output alone with the others'
      grad_outputs undefined (``None``, as a backward sees them under
      ``ctx.set_materialize_grads(False)``) gives the same as with them defined as zeros;
    * when the finite differences run under ``torch.func.vmap``, the vmapped evaluation at the
      unperturbed point equals ``fn(x)``; otherwise the error names the (custom) vmap rule.

    With ``forward_ad=True`` forward mode is checked too: Jacobian-vector products (the ``jvp``
    of custom Functions, :func:`torch.func.jvp`) against the finite differences in full mode,
    against the finite differences and reverse mode per probe in fast mode. The default is
    ``False``, like ``gradcheck``, since some operations have no forward rule.

    Kinks: a mismatching entry whose left and right one-sided differences disagree beyond the
    tolerance at two step sizes (``h`` and ``h/10``: a jump, not curvature) *and* whose
    analytical value lies between them is a non-differentiable point (``relu``/``abs`` at 0,
    ``max`` with ties), not a wrong gradient: with ``kinks="raise"``
    :class:`NonDifferentiablePointError` is raised, with ``kinks="skip"`` the entry is left out
    and listed in ``report.kinks``. Any other mismatch raises :class:`GradientCheckError`.

    Works with ``torch.autograd.Function`` subclasses old-style (``ctx`` in ``forward``) and
    new-style (``setup_context``): what cannot be vmapped is evaluated in a loop. The caller's
    tensors are never modified (``fn`` gets copies; no ``.grad``/``requires_grad`` changes), the
    global RNG is not touched, and it works under ``torch.no_grad()``.

    Args:
        fn: function of the input tensors returning a tensor or a tuple/list of tensors.
        *inputs: tensors on one device (see "What is differentiated"); differentiated ones must
            be dense float32/float64/complex64/complex128 (bind non-tensor arguments with
            ``functools.partial``).
        order: 1, or 2 to also check second derivatives (``gradgradcheck``).
        mode: ``"full"`` (every entry) or ``"fast"`` (random signed directions).
        atol: absolute tolerance (``None``: by dtype, see above).
        rtol: relative tolerance (``None``: by dtype).
        eps: base finite-difference step (``None``: by dtype, see :func:`numerical_jacobian`).
        method: ``"central"`` or ``"richardson"`` finite differences.
        probes: direction pairs per output/input block in fast mode.
        directions: ``"rademacher"`` (random +-1, the default: exact for single-entry errors)
            or ``"gaussian"``.
        seed: seed of the random directions/cotangents; ``None`` draws a fresh one (the global
            torch RNG is not touched). It is printed in error messages and stored in the report.
        kinks: ``"raise"`` or ``"skip"`` (see above).
        forward_ad: also check forward mode (see above).
        nondet_tol: largest difference allowed between two runs of the backward with the same
            inputs and grad_outputs (``0.0``: bitwise equal).

    Returns:
        A :class:`GradientCheckReport` (always, when nothing failed).

    Raises:
        GradientCheckError: an analytical derivative is wrong, or a contract above is broken
            (including ``fn`` modifying its inputs, a backward modifying its grad_output or
            returning NaN/inf, ``fn`` giving different outputs for the same inputs). The
            message names the output and input, the worst element's index in each, both
            values and the tolerance.
        NonDifferentiablePointError: with ``kinks="raise"``, mismatches only at kinks.
        TypeError: ``fn`` not callable, a differentiated input not a dense float/complex tensor,
            ``fn`` returning a non-tensor or only integer tensors, ``forward_ad`` not a bool.
        ValueError: inputs on different devices, a bad option value, a NaN/inf or empty
            differentiated input, ``fn`` not finite at the inputs, or ``mode="full"`` on a
            Jacobian too large for the free memory (the message says to use ``"fast"``).
        gradlab.GraphError: ``order=2`` and ``fn``'s backward is not differentiable, or
            ``forward_ad=True`` and ``fn`` has no forward-mode rule.

    Example:
        >>> from gradlab.testing import check_gradients, GradientCheckError
        >>> A = torch.randn(4, 3, dtype=torch.float64)
        >>> x = torch.randn(3, dtype=torch.float64)
        >>> report = check_gradients(lambda x: torch.tanh(A @ x), x)
        >>> report.compared, report.margin < 1
        (12, True)
        >>> report = check_gradients(lambda x: torch.tanh(A @ x), x, order=2, mode="fast")
        >>> report.order, report.mode
        (2, 'fast')
        >>> class BadSquare(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x**2
        ...     @staticmethod
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return g * 2.002 * x  # 0.1 % too large
        >>> try:
        ...     check_gradients(BadSquare.apply, torch.tensor([0.5, -2.0, 1.0]).double())
        ... except GradientCheckError as e:
        ...     print(e.location)
        d output 0[1] / d input 0[1]
    """
    check_fn(fn, CALLER)
    v.check_choice(CALLER, "order", order, (1, 2))
    v.check_choice(CALLER, "mode", mode, ("full", "fast"))
    v.check_choice(CALLER, "method", method, tuple(METHODS))
    v.check_choice(CALLER, "directions", directions, ("rademacher", "gaussian"))
    v.check_choice(CALLER, "kinks", kinks, ("raise", "skip"))
    if eps is not None:
        eps = v.check_positive(CALLER, "eps", eps)
    v.check_int(CALLER, "probes", probes, minimum=1)
    if seed is not None:
        seed = v.check_int(CALLER, "seed", seed, fix="Pass an int seed, or None for a fresh one")
    v.check_bool(
        CALLER, "forward_ad", forward_ad, fix="Pass forward_ad=True to also check forward mode"
    )
    nondet = v.check_nonnegative(CALLER, "nondet_tol", nondet_tol)
    if atol is not None:
        atol = v.check_nonnegative(CALLER, "atol", atol)
    if rtol is not None:
        rtol = v.check_nonnegative(CALLER, "rtol", rtol)
    pre = prepare(fn, inputs, mode, nondet)
    xs, f0 = pre.xs, pre.f0
    d_atol, d_rtol = default_tolerances(list(xs) + list(f0))
    st = Settings(
        mode=mode,
        method=method,
        eps=eps,
        atol=d_atol if atol is None else atol,
        rtol=d_rtol if rtol is None else rtol,
        probes=probes,
        directions=directions,
        seed=int.from_bytes(os.urandom(4), "little") if seed is None else seed,
        kinks=kinks,
        order=1,
        unit=machine_eps(least_precise(list(xs) + list(f0))),
        nondet_tol=nondet,
        forward_ad=forward_ad,
        eval_seconds=pre.eval_seconds,
        outputs=pre.outputs,
        inputs=pre.inputs,
        n_x=len(xs),
    )
    report = _report(_compare(first_order(pre.fn), xs, st, f0), st, xs, None, pre.outputs)
    if order == 1:
        return report
    problem, vs = second_order(pre.fn, xs, f0, st.seed)
    st.order = 2
    st.outputs = pre.inputs
    st.inputs = pre.inputs + pre.outputs
    st.checks = []
    try:
        acc = _compare(problem, xs + vs, st)
    except (GradientCheckError, NonDifferentiablePointError):
        raise
    except Exception as e:
        raise GraphError(
            f"{CALLER}: order=2 needs fn's backward to be differentiable, but double backward "
            f"failed with {type(e).__name__}: {e}. Make the backward of fn differentiable "
            "(no @once_differentiable, "
            "no .detach()) or check with order=1."
        ) from None
    return _report(acc, st, xs + vs, report, pre.outputs)


def _report(
    acc: Acc,
    st: Settings,
    xs: tuple[torch.Tensor, ...],
    first: GradientCheckReport | None,
    outputs: tuple[int, ...],
) -> GradientCheckReport:
    eps = tuple(st.eps if st.eps is not None else default_step(st.method, x.dtype) for x in xs)
    return GradientCheckReport(
        order=st.order,
        mode=st.mode,
        method=st.method,
        atol=st.atol,
        rtol=st.rtol,
        eps=eps,
        max_abs_error=acc.max_abs,
        max_rel_error=acc.max_rel,
        worst=acc.worst,
        margin=acc.margin,
        compared=acc.compared,
        probes=st.probes if st.mode == "fast" else 0,
        seed=st.seed,
        kinks=tuple(acc.kinks),
        first_order=first,
        inputs=st.inputs[: st.n_x],
        outputs=outputs,
        checks=tuple(st.checks),
    )
