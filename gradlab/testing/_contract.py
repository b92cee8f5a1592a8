"""Contract checks of a backward that a Jacobian comparison alone cannot see.

Run with plain ``torch.autograd.grad`` calls through the autograd graph on one or two random
Rademacher cotangents per output, so they cost a few vector-Jacobian products, not another
Jacobian:

* **grad_output untouched**: the first of those backwards leaves its grad_output as it was and
  returns finite values (a backward writing into grad_output returns right numbers but
  overwrites the caller's cotangent).
* **reentrant**: the backward run twice with the same inputs and grad_output ``-2 u`` gives the
  same result to ``nondet_tol`` (``gradcheck``'s "Backward is not reentrant").
* **grad_output scaling**: ``vjp(-2 u) = -2 vjp(u)``, ``vjp(u)`` taken from the analytical
  Jacobian (full mode) or the fast-mode probes: a backward that ignores grad_output, or adds a
  constant to it, is invisible to a scalar-output Jacobian, whose only cotangent is 1
  (``gradcheck``'s "backward not multiplied by grad_output"; for a backward affine in
  grad_output, ``vjp(g) = L g + b``, the two sides differ by ``3 b``).
* **undefined grad_outputs**: with several outputs, ``u_i^T J_i`` is computed with the other
  outputs' grad_outputs undefined (``None``, what a backward sees under
  ``ctx.set_materialize_grads(False)``) and compared with the all-defined ``u_i^T J_i`` that the
  Jacobian comparison has verified.
"""

from __future__ import annotations

import torch

from gradlab.testing._analytical import Analytic
from gradlab.testing._errors import GradientCheckError
from gradlab.testing._report import CALLER, Settings, fmt

__all__ = [
    "UNDEFINED_PROBES",
    "check_backward",
    "check_undefined",
]

#: Cotangents per output for the undefined-grad_output check.
UNDEFINED_PROBES = 2


def _worst(diff: torch.Tensor, tol: torch.Tensor) -> tuple[int, float, float] | None:
    """Index, difference and tolerance of the worst failing entry (NaN fails), or ``None``."""
    bad = ~(diff <= tol)
    if not bool(bad.any()):
        return None
    ratio = torch.where(bad, (diff / tol).nan_to_num(nan=float("inf")), torch.zeros_like(diff))
    k = int(torch.argmax(ratio.reshape(-1)))
    return k, float(diff.reshape(-1)[k]), float(tol.reshape(-1)[k])


def _vjp(an: Analytic, i: int, u: torch.Tensor) -> list[torch.Tensor]:
    """``u^T J_i`` with the other outputs' grad_outputs zero."""
    cots = tuple(u if k == i else torch.zeros_like(o) for k, o in enumerate(an.f0))
    return an.graph_vjp(cots)


def _check_untouched(
    i: int,
    cot: torch.Tensor,
    ref: torch.Tensor,
    res: list[torch.Tensor],
    st: Settings,
) -> None:
    """After a plain vjp with grad_output ``cot`` (a copy of ``ref``): ``cot`` is unchanged and
    the result finite.

    A backward that writes into its grad_output (``return g.mul_(torch.cos(x))``) returns the
    right numbers, so no comparison sees it, but it overwrites the caller's cotangent (in a
    network: the gradient flowing into a sibling branch). A NaN or inf result at a finite point
    is named here too, before the other contracts would blame grad_output scaling.
    """
    if not torch.equal(cot, ref):
        changed = ~((cot == ref) | (cot.isnan() & ref.isnan()))
        k = int(changed.reshape(-1).nonzero()[0])
        raise GradientCheckError(
            f"{CALLER}: the backward of fn modified its grad_output in place for output "
            f"{st.outputs[i]}: flat element {k} of the grad_output was "
            f"{fmt(float(ref.reshape(-1)[k]))} before the backward and "
            f"{fmt(float(cot.reshape(-1)[k]))} after it. The grad_output belongs to the "
            "caller (autograd passes the same tensor on to other branches): compute out of "
            "place (return g * torch.cos(x), not g.mul_(torch.cos(x))). "
            f"{st.tag()}",
            location=st.loc(i, 0),
        )
    for j, r in enumerate(res):
        if bool(r.isfinite().all()):
            continue
        k = int(r.isfinite().logical_not().reshape(-1).nonzero()[0])
        raise GradientCheckError(
            f"{CALLER}: the backward returned {fmt(float(r[k]))} for {st.loc(i, j)} "
            f"(flat input element {k}) at a point where every input and output of fn "
            "is finite. Either the derivative is infinite here (sqrt or log at 0, "
            "a pole: check at another point) or the backward computes NaN/inf (0/0, "
            "inf * 0, an unguarded division). "
            f"{st.tag()}",
            location=st.loc(i, j),
            analytical=float(r[k]),
        )


def check_backward(
    an: Analytic, us: list[torch.Tensor], rows: list[list[torch.Tensor]], st: Settings
) -> None:
    """Reentrancy and grad_output scaling on the first cotangent ``u`` of ``us[i]`` per output;
    ``rows[i][j][0]`` is ``u^T J_ij`` as computed for the Jacobian (or the probes)."""
    for i, u in enumerate(us):
        if u.numel() == 0:
            continue
        cot = -2 * u[0]
        ref = cot.clone()
        first = _vjp(an, i, cot)
        _check_untouched(i, cot, ref, first, st)
        second = _vjp(an, i, ref.clone())
        for j, (r1, r2) in enumerate(zip(first, second)):
            if r1.numel() == 0:
                continue
            same = (r1 == r2) | (r1.isnan() & r2.isnan())
            diff = torch.where(same, torch.zeros_like(r1), (r1 - r2).abs())
            bad = _worst(diff, torch.full_like(diff, st.nondet_tol))
            if bad is not None:
                k, d, _ = bad
                raise GradientCheckError(
                    f"{CALLER}: backward is not reentrant: run twice with the same inputs and "
                    f"grad_outputs it gave {fmt(float(r1[k]))} and then {fmt(float(r2[k]))} "
                    f"for {st.loc(i, j)} (|difference| {d:.3e} > nondet_tol "
                    f"{st.nondet_tol:g}). {st.tag()} Make the backward deterministic (no "
                    "randomness, no state changed by a call, no in-place change of saved "
                    "tensors); if it is nondeterministic on purpose (e.g. atomic adds on a GPU), "
                    "pass nondet_tol=<largest expected difference>.",
                    location=st.loc(i, j),
                    analytical=float(r2[k]),
                    numerical=float(r1[k]),
                    tolerance=st.nondet_tol,
                )
            r3, expect = r1, -2 * rows[i][j][0].to(r1.dtype)
            tol = st.atol + st.rtol * expect.abs() + 3 * st.nondet_tol
            bad = _worst((r3 - expect).abs(), tol)
            if bad is not None:
                k, d, t = bad
                raise GradientCheckError(
                    f"{CALLER}: backward not multiplied by grad_output for {st.loc(i, j)}: "
                    f"with grad_output -2 u it gives {fmt(float(r3[k]))}, but -2 times the "
                    f"result for u is {fmt(float(expect[k]))} (|difference| {d:.3e} > "
                    f"tolerance {t:.3e}). {st.tag()} A backward must be linear in grad_output: "
                    "multiply the local derivative by grad_output (and add no constant).",
                    location=st.loc(i, j),
                    analytical=float(r3[k]),
                    numerical=float(expect[k]),
                    tolerance=t,
                )
    st.ran("grad_output untouched")
    st.ran("reentrant")
    st.ran("grad_output scaling")


def check_undefined(
    an: Analytic, us: list[torch.Tensor], rows: list[list[torch.Tensor]], st: Settings
) -> None:
    """Backpropagate through each output alone (the others' grad_outputs undefined) and compare
    with ``rows[i][j]`` (``[p, n_j]``, the verified all-defined ``u^T J_ij`` for the first
    probes of ``us[i]``). Only when several outputs are differentiable."""
    if len(an.f0) < 2:
        return
    outs, _ = an.graph()
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    if len(live) < 2:
        return
    for i in live:
        others = ", ".join(str(st.outputs[k]) for k in live if k != i)
        for probe in range(min(UNDEFINED_PROBES, us[i].shape[0])):
            cots = tuple(us[i][probe] if k == i else None for k in range(len(outs)))
            try:
                alone = an.graph_vjp(cots)
            except Exception as e:
                raise GradientCheckError(
                    f"{CALLER}: backward fails when only output {st.outputs[i]} has a "
                    f"grad_output and those of outputs {others} are undefined (None): "
                    f"{type(e).__name__}: {e}. {st.tag()} Handle None grad_outputs in the "
                    "backward (they are None under ctx.set_materialize_grads(False) for "
                    "outputs that do not reach the loss).",
                    location=st.loc(i, 0),
                ) from None
            for j, a in enumerate(alone):
                b = rows[i][j][probe].to(a.dtype)
                tol = st.atol + st.rtol * b.abs() + 2 * st.nondet_tol
                bad = _worst((a - b).abs(), tol)
                if bad is not None:
                    k, d, t = bad
                    raise GradientCheckError(
                        f"{CALLER}: wrong derivative {st.loc(i, j)} when the grad_outputs of "
                        f"outputs {others} are undefined (None): u^T J is "
                        f"{fmt(float(a[k]))} at flat input element {k} (random signs u, probe "
                        f"{probe + 1}), but {fmt(float(b[k]))} with them defined as zeros, "
                        f"which matches the finite differences (|difference| {d:.3e} > "
                        f"tolerance {t:.3e}). {st.tag()} Fix the branch of the backward that "
                        "handles None grad_outputs.",
                        location=st.loc(i, j),
                        analytical=float(a[k]),
                        numerical=float(b[k]),
                        tolerance=t,
                    )
    st.ran("undefined grad_outputs")
