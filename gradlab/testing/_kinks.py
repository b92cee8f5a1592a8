"""Non-differentiable points: telling a kink (relu at 0, max with ties) from a wrong gradient."""

from __future__ import annotations

import torch

from gradlab.testing._common import NOISE_FACTOR
from gradlab.testing._errors import NonDifferentiablePointError
from gradlab.testing._report import CALLER, Location, Settings, fmt
from gradlab.testing.numerical import Evaluator, exact_delta

__all__ = ["kink_mask", "raise_kink"]


def _one_sided(
    ev: Evaluator, j: int, cols: torch.Tensor, step: torch.Tensor, scale: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward and backward one-sided differences for elements ``cols``: per output [m_i, c]."""
    x = ev.xs[j].reshape(-1)
    h = step[cols] * scale
    plus, minus = exact_delta(x[cols], h), exact_delta(x[cols], -h)
    c, n = len(cols), x.numel()
    disp = torch.zeros(2 * c, n, dtype=x.dtype, device=x.device)
    ar = torch.arange(c, device=x.device)
    disp[ar, cols] = plus
    disp[c + ar, cols] = minus
    f = ev.displaced(j, disp)
    fwd = [((fi[:c] - f0.reshape(1, -1)) / plus.unsqueeze(1)).T for fi, f0 in zip(f, ev.f0)]
    bwd = [((f0.reshape(1, -1) - fi[c:]) / (-minus).unsqueeze(1)).T for fi, f0 in zip(f, ev.f0)]
    return fwd, bwd


def kink_mask(
    ev: Evaluator,
    i: int,
    j: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    a: torch.Tensor,
    step: torch.Tensor,
    st: Settings,
    unit: float,
) -> torch.Tensor:
    """For each mismatching entry: is it a kink (see :class:`NonDifferentiablePointError`)?

    A kink: the left and right one-sided differences disagree beyond the tolerance at two step
    sizes (``h`` and ``h/10``: a jump, not curvature) *and* the analytical value lies between.
    """
    ucols, inv = torch.unique(cols, return_inverse=True)
    fb, bb = _one_sided(ev, j, ucols, step, 1.0)
    fs, bs = _one_sided(ev, j, ucols, step, 0.1)
    right, left = fs[i][rows, inv], bs[i][rows, inv]
    gap_small = (right - left).abs()
    gap_big = (fb[i][rows, inv] - bb[i][rows, inv]).abs()
    f0 = ev.f0[i].reshape(-1)[rows].abs()
    noise = 2 * NOISE_FACTOR[st.method] * unit * f0 / (0.1 * step[cols])
    tol = st.atol + st.rtol * torch.maximum(left.abs(), right.abs()) + noise
    av = a[rows, cols].to(left.dtype)
    between = (av >= torch.minimum(left, right) - tol) & (av <= torch.maximum(left, right) + tol)
    return (gap_small > tol) & (gap_small >= 0.5 * gap_big) & between


def raise_kink(
    locs: list[Location],
    ev: Evaluator,
    i: int,
    j: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    a: torch.Tensor,
    n: torch.Tensor,
    step: torch.Tensor,
    st: Settings,
) -> None:
    r, c = int(rows[0]), int(cols[0])
    fs, bs = _one_sided(ev, j, cols[:1], step, 0.1)
    raise NonDifferentiablePointError(
        f"{CALLER}: {len(locs)} Jacobian "
        f"{'entry is' if len(locs) == 1 else 'entries are'} at non-differentiable points "
        f"(kinks), first {locs[0]}: one-sided differences disagree "
        f"(left {fmt(float(bs[i][r, 0]))}, "
        f"right {fmt(float(fs[i][r, 0]))}; analytical {fmt(float(a[r, c]))} lies between, "
        f"central difference {fmt(float(n[r, c]))}). The gradient is not wrong, the point is "
        "not differentiable: move it away from the kink (e.g. strategies.tensors(avoid=..., "
        "margin=...)) or pass kinks='skip' to record such entries in the report. "
        f"[order {st.order}, mode {st.mode!r}, method {st.method!r}]",
        kinks=tuple(locs),
    )
