"""Contract checks of a backward that a Jacobian comparison alone cannot see.

Run on a few random Rademacher cotangents ``u`` per output (the fast-mode probes, or
:data:`CONTRACT_PROBES` of them in full mode), so they cost a few small batched backward passes,
not another Jacobian:

* **reentrant**: the backward run twice with the same inputs and grad_outputs gives the same
  result to ``nondet_tol`` (``gradcheck``'s "Backward is not reentrant").
* **grad_output scaling**: ``vjp(-2 u) = -2 vjp(u)`` and ``vjp(0) = 0``: a backward that ignores
  or offsets ``grad_output`` is invisible to a scalar-output Jacobian, whose only cotangent is 1
  (``gradcheck``'s "backward not multiplied by grad_output").
* **undefined grad_outputs**: with several outputs, ``u_i^T J_i`` is computed again through the
  autograd graph with the other outputs' grad_outputs undefined (``None``, what a backward sees
  under ``ctx.set_materialize_grads(False)``) and compared with the all-defined result, which the
  Jacobian comparison has verified.
"""

from __future__ import annotations

import torch

from gradlab.testing._analytical import Analytic
from gradlab.testing._errors import GradientCheckError
from gradlab.testing._report import CALLER, Settings, fmt

__all__ = ["CONTRACT_PROBES", "check_undefined", "probe_rows"]

#: Random cotangents per output for the contract checks in full mode.
CONTRACT_PROBES = 4


def _worst(diff: torch.Tensor, tol: torch.Tensor) -> tuple[int, float, float] | None:
    """Index, difference and tolerance of the worst failing entry (NaN fails), or ``None``."""
    bad = ~(diff <= tol)
    if not bool(bad.any()):
        return None
    ratio = torch.where(bad, (diff / tol).nan_to_num(nan=float("inf")), torch.zeros_like(diff))
    k = int(torch.argmax(ratio.reshape(-1)))
    return k, float(diff.reshape(-1)[k]), float(tol.reshape(-1)[k])


def probe_rows(an: Analytic, us: list[torch.Tensor], st: Settings) -> list[list[torch.Tensor]]:
    """``u^T J_i`` per output ``i`` (per input ``[p, n_j]``), after checking that the backward
    is reentrant and linear in grad_output."""
    result = []
    for i, u in enumerate(us):
        p = u.shape[0]
        batch = torch.cat([u, -2 * u, torch.zeros_like(u[:1])])
        first = an.rows(i, batch)
        second = an.rows(i, batch)
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
                    f"grad_outputs it gave {fmt(float(r1.reshape(-1)[k]))} and then "
                    f"{fmt(float(r2.reshape(-1)[k]))} for {st.loc(i, j)} "
                    f"(|difference| {d:.3e} > nondet_tol {st.nondet_tol:g}). {st.tag()} Make "
                    "the backward deterministic (no randomness, no state changed by a call, no "
                    "in-place change of saved tensors); if it is nondeterministic on purpose "
                    "(e.g. atomic adds on a GPU), pass nondet_tol=<largest expected difference>.",
                    location=st.loc(i, j),
                    analytical=float(r2.reshape(-1)[k]),
                    numerical=float(r1.reshape(-1)[k]),
                    tolerance=st.nondet_tol,
                )
            base, scaled, zero = r1[:p], r1[p : 2 * p], r1[2 * p :]
            expect = -2 * base
            tol = st.atol + st.rtol * expect.abs() + 3 * st.nondet_tol
            bad = _worst((scaled - expect).abs(), tol)
            zbad = _worst(zero.abs(), torch.full_like(zero, st.nondet_tol))
            if bad is not None or zbad is not None:
                if zbad is not None:
                    k, d, t = zbad
                    got, want, how = float(zero.reshape(-1)[k]), 0.0, "grad_output = 0"
                else:
                    assert bad is not None
                    k, d, t = bad
                    got, want = float(scaled.reshape(-1)[k]), float(expect.reshape(-1)[k])
                    how = "grad_output -2 u (expected -2 times the result for u)"
                raise GradientCheckError(
                    f"{CALLER}: backward not multiplied by grad_output for {st.loc(i, j)}: with "
                    f"{how} it gives {fmt(got)}, expected {fmt(want)} (|difference| {d:.3e} > "
                    f"tolerance {t:.3e}). {st.tag()} A backward must be linear in grad_output: "
                    "multiply the local derivative by grad_output (and add no constant).",
                    location=st.loc(i, j),
                    analytical=got,
                    numerical=want,
                    tolerance=t,
                )
        result.append([r[:p] for r in first])
    st.ran("reentrant")
    st.ran("grad_output scaling")
    return result


def check_undefined(
    an: Analytic, us: list[torch.Tensor], rows: list[list[torch.Tensor]], st: Settings
) -> None:
    """Backpropagate through each output alone (the others' grad_outputs undefined) and compare
    with ``rows`` (the all-defined ``u_i^T J_i``). Only for several differentiable outputs."""
    if len(an.f0) < 2:
        return
    outs, _ = an.graph()
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    if len(live) < 2:
        return
    for i in live:
        cots = tuple(us[i] if k == i else None for k in range(len(outs)))
        others = ", ".join(str(st.outputs[k]) for k in live if k != i)
        try:
            alone = an.graph_rows(cots)
        except Exception as e:
            raise GradientCheckError(
                f"{CALLER}: backward fails when only output {st.outputs[i]} has a grad_output "
                f"and those of outputs {others} are undefined (None): {type(e).__name__}: {e}. "
                f"{st.tag()} Handle None grad_outputs in the backward (they are None under "
                "ctx.set_materialize_grads(False) for outputs that do not reach the loss).",
                location=st.loc(i, 0),
            ) from None
        for j, (a, b) in enumerate(zip(alone, rows[i])):
            tol = st.atol + st.rtol * b.abs() + 2 * st.nondet_tol
            bad = _worst((a - b).abs(), tol)
            if bad is not None:
                k, d, t = bad
                probe, el = divmod(k, a.shape[1])
                raise GradientCheckError(
                    f"{CALLER}: wrong derivative {st.loc(i, j)} when the grad_outputs of outputs "
                    f"{others} are undefined (None): u^T J is {fmt(float(a.reshape(-1)[k]))} "
                    f"(probe {probe + 1}, flat input element {el}), but "
                    f"{fmt(float(b.reshape(-1)[k]))} with them defined as zeros, which matches "
                    f"the finite differences (|difference| {d:.3e} > tolerance {t:.3e}). "
                    f"{st.tag()} Fix the branch of the backward that handles None grad_outputs.",
                    location=st.loc(i, j),
                    analytical=float(a.reshape(-1)[k]),
                    numerical=float(b.reshape(-1)[k]),
                    tolerance=t,
                )
    st.ran("undefined grad_outputs")
