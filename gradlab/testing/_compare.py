"""The full comparison: one ``[m_i, n_j]`` block of analytical against numerical derivatives."""

from __future__ import annotations

import math

import torch

from gradlab.testing._common import NOISE_FACTOR
from gradlab.testing._kinks import kink_mask, raise_kink
from gradlab.testing._report import Acc, Location, Settings, raise_wrong, unravel
from gradlab.testing.numerical import Evaluator, fd_transposed

__all__ = ["check_block", "fd_all"]


def fd_all(ev: Evaluator, j: int, step: torch.Tensor, method: str) -> list[torch.Tensor]:
    """Finite-difference blocks ``[m_i, n_j]`` w.r.t. input ``j`` (views, not copies)."""
    return [b.T for b in fd_transposed(ev, j, step, method)]


def check_block(
    ev: Evaluator,
    i: int,
    j: int,
    a: torch.Tensor,
    n: torch.Tensor,
    step: torch.Tensor,
    st: Settings,
    unit: float,
    acc: Acc,
    *,
    forward: bool = False,
) -> None:
    """Compare one full ``[m_i, n_j]`` block; raise on a wrong entry or (by default) a kink.

    The passing case (every entry within tolerance) costs a few vectorised passes, done on the
    transposed ``[n_j, m_i]`` views since that is the memory layout both Jacobians come in;
    only when something mismatches are the bad entries located and examined. ``forward``: ``a``
    comes from forward mode (jvp), which the error message then names.
    """
    if n.numel() == 0:  # an empty output or input: no entry to compare
        return
    a = a.to(n.dtype)
    out_shape, in_shape = ev.f0[i].shape, ev.xs[j].shape
    m = n.shape[0]
    a_t, n_t = a.T, n.T
    # Few fresh allocations and in-place passes: at n = 512 a new 2 MB tensor costs more than
    # the arithmetic that fills it.
    diff_t = torch.sub(a_t, n_t).abs_()
    abs_t = n_t.abs()
    # atol + rtol |n| + c u |f0_r| / h_c (the rounding noise, an outer product)
    noise_row = NOISE_FACTOR[st.method] * unit * ev.f0[i].detach().reshape(1, -1).abs()
    tol_t = torch.mul(abs_t, st.rtol).add_(st.atol)
    tol_t.addcmul_(step.reciprocal().reshape(-1, 1), noise_row)
    work = torch.div(diff_t, tol_t)
    margin = float(work.max())
    # fl(d / t) < 1 implies d < t, so only a margin of 1 or NaN (e.g. 0 / 0) needs the exact test.
    if margin < 1 or (not margin > 1 and bool((diff_t <= tol_t).all())):

        def where_t(k: int) -> Location:
            c, r = divmod(k, m)
            return st.loc(i, j, unravel(r, out_shape), unravel(c, in_shape))

        acc.add(diff_t, tol_t, abs_t, st.atol, where_t, margin=margin, work=work)
        return
    diff, tol = diff_t.T, tol_t.T
    bad = ~(diff <= tol)

    def where(k: int) -> Location:
        r, c = divmod(k, n.shape[1])
        return st.loc(i, j, unravel(r, out_shape), unravel(c, in_shape))

    rows, cols = bad.nonzero(as_tuple=True)
    is_kink = kink_mask(ev, i, j, rows, cols, a, step, st, unit)
    wrong = ~is_kink
    if bool(wrong.any()):
        d = torch.where(wrong, diff[rows, cols], torch.zeros_like(diff[rows, cols]))
        k = int(torch.argmax(torch.nan_to_num(d, nan=math.inf)))
        r, c = int(rows[k]), int(cols[k])
        raise_wrong(
            where(r * n.shape[1] + c),
            float(a[r, c]),
            float(n[r, c]),
            float(diff[r, c]),
            float(tol[r, c]),
            float(n[r, c].abs()),
            int(wrong.sum()),
            n.numel(),
            st,
            kinks=int(is_kink.sum()),
            forward=forward,
        )
    kink_locs = [where(int(r) * n.shape[1] + int(c)) for r, c in zip(rows, cols)]
    if st.kinks == "raise":
        raise_kink(kink_locs, ev, i, j, rows, cols, a, n, step, st)
    acc.kinks.extend(kink_locs)
    keep = ~bad
    acc.add(
        diff[keep],
        tol[keep],
        n[keep].abs(),
        st.atol,
        lambda k: where(int(keep.reshape(-1).nonzero()[k])),
    )
