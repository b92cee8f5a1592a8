"""The vmap rule check: the vmapped evaluation of ``fn`` at the base point must equal ``fn(x)``.

The finite differences evaluate ``fn`` under :func:`torch.func.vmap`, so a wrong batching rule
(a custom ``autograd.Function.vmap``, or a hand-written batched path) makes them differentiate
another function, and the mismatch would be blamed on the gradient (or on kinks). The first
vmapped batch per input therefore carries the unperturbed point as one extra row, which must
reproduce ``f0 = fn(x)`` to within what the finite differences could not see anyway:
``h * (atol + rtol * |f0|)`` (an error below that changes no difference quotient beyond the
tolerance) plus ``64 * u * max|f0|`` for the rounding of a batched kernel (``u`` the unit
roundoff; norm-wise, since a batched sum rounds differently where the sum cancels: measured
below ``5 u max|f0|`` for ``A @ x`` up to n = 4096).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradlab.testing._common import default_step
from gradlab.testing._errors import GradientCheckError
from gradlab.testing._report import CALLER, Settings, fmt, unravel

__all__ = ["base_point_check"]


def base_point_check(
    st: Settings, f0: tuple[torch.Tensor, ...], xs: tuple[torch.Tensor, ...], unit: float
) -> Callable[[int, list[torch.Tensor]], None]:
    """A callback for :class:`~gradlab.testing.numerical.Evaluator`'s ``check_base``."""

    def check(j: int, base: list[torch.Tensor]) -> None:
        h = st.eps if st.eps is not None else default_step(st.method, xs[j].dtype)
        for i, (got, want) in enumerate(zip(base, f0)):
            want_flat = want.reshape(-1).to(got.dtype)
            size = want_flat.abs()
            finite = torch.nan_to_num(size, nan=0.0, posinf=0.0)
            top = float(finite.max()) if finite.numel() else 0.0
            tol = h * (st.atol + st.rtol * size) + 64 * unit * top
            diff = (got.reshape(-1) - want_flat).abs()
            bad = ~(diff <= tol) & ~(got.reshape(-1).isnan() & want_flat.isnan())
            if bool(bad.any()):
                k = int(torch.argmax(torch.where(bad, diff.nan_to_num(nan=float("inf")), 0.0)))
                el = unravel(k, want.shape)
                got_k = fmt(float(got.reshape(-1)[k]))
                raise GradientCheckError(
                    f"{CALLER}: the vmap rule of fn is wrong: evaluated under torch.func.vmap "
                    f"(batched over input {st.inputs[j]}), fn gives {got_k} "
                    f"at the unperturbed point for output {st.outputs[i]}{list(el)}, but "
                    f"{fmt(float(want_flat[k]))} when called directly (|difference| "
                    f"{float(diff[k]):.3e} > tolerance {float(tol[k]):.3e}; {int(bad.sum())} "
                    f"elements differ). {st.tag()} The finite differences run under vmap, so "
                    "they would check another function. Fix the custom vmap rule (the "
                    "autograd.Function's vmap staticmethod, or generate_vmap_rule=True), or "
                    "whatever in fn behaves differently when batched.",
                    location=st.loc(i, j, el, None),
                    analytical=float(want_flat[k]),
                    numerical=float(got.reshape(-1)[k]),
                    tolerance=float(tol[k]),
                )
        st.ran("vmap rule")

    return check
