r"""Fast mode: random signed direction pairs instead of every Jacobian entry.

Per output/input block, ``probes`` pairs ``(u, v)`` compare :math:`u^\top J v` from one batched
vjp against :math:`u^\top (f(x + hv) - f(x - hv)) / 2h`.

Why fast mode needs signed directions and an uninflated tolerance: if ``J`` has one wrong entry
:math:`E_{rc} = d`, then :math:`u^\top E v = u_r v_c d`. With Rademacher (random +-1) directions
this is exactly :math:`\pm d` for *every* probe, so the error is seen whenever
``|d| > atol + rtol * ||J v||_2`` (``||J v||_2`` is the typical size of :math:`u^\top J v` over
random ``u``, about ``||J||_F``). torch's ``gradcheck(fast_mode=True)`` instead scales ``atol``
by ``sum(u) * sum(v)`` over non-negative directions, which at n = 512 allows errors of order 1.
"""

from __future__ import annotations

import torch

from gradlab.testing._analytical import Analytic, analytical_jacobian
from gradlab.testing._common import NOISE_FACTOR, default_step
from gradlab.testing._compare import check_block, fd_all
from gradlab.testing._forward import Forward
from gradlab.testing._report import Acc, Settings, constant, raise_wrong
from gradlab.testing.numerical import Evaluator

__all__ = ["directions", "fast"]

#: Largest block (entries) fast mode localises with a full comparison after a failed probe.
_LOCALIZE_LIMIT = 2**22


def directions(
    n: int, shape: tuple[int, ...], st: Settings, gen: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """``n`` random directions of ``shape``: Rademacher (+-1) or Gaussian per ``st``.

    Laid out with the probe index fastest (``d[:, k]`` contiguous, like the column-major basis of
    :func:`~gradlab.testing._analytical.analytical_jacobian`): a batched vjp through a matrix
    product then runs as one well-shaped GEMM. With the probe index slowest, vmap's batching
    rule for ``mv``/``matmul`` hands BLAS a layout that made the 16-probe vjp of ``tanh(A @ x)``
    2.5x slower at n = 1024 (a cost growing as ``n^2``); the values are the same either way.
    """
    if st.directions == "rademacher":
        d = torch.randint(0, 2, (n, *shape), generator=gen).mul(2).sub(1)
    else:
        d = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    d = d.to(dtype=like.dtype, device=like.device)
    if n > 1 and d[0].numel() > 1:
        d = d.reshape(n, -1).T.contiguous().T.reshape(d.shape)
    return d


def fast(
    ev: Evaluator,
    an: Analytic,
    steps: list[torch.Tensor],
    st: Settings,
    unit: float,
    acc: Acc,
    us: list[torch.Tensor],
    vs: list[torch.Tensor],
    jtu: list[list[torch.Tensor]],
    fwd: Forward | None,
) -> None:
    """Compare ``u^T J v`` per probe and block; ``jtu[i][j]``: ``u_i^T J_ij`` (``[p, n_j]``)."""
    p = st.probes
    outs = ev.f0
    for j, x in enumerate(ev.xs):
        if x.numel() == 0:
            continue
        base = st.eps if st.eps is not None else default_step(st.method, x.dtype)
        w = vs[j] * (steps[j] / base)  # directions scaled like the steps: max(1, |x_k|)
        levels = [1.0] if st.method == "central" else [1.0, 0.5]
        disp = torch.cat([s * lv * base * w for lv in levels for s in (1.0, -1.0)])
        f = ev.displaced(j, disp)
        jv_fwd = fwd.columns(j, w) if fwd is not None else None
        for i in range(len(outs)):
            fi = f[i]
            jv = (fi[:p] - fi[p : 2 * p]) / (2 * base)
            if st.method == "richardson":
                jv_half = (fi[2 * p : 3 * p] - fi[3 * p :]) / base
                jv = (4 * jv_half - jv) / 3
            u = us[i].reshape(p, -1).to(jv.dtype)
            num = (u * jv).sum(1)
            ana = (jtu[i][j].to(w.dtype) * w).sum(1).to(num.dtype)
            scale = jv.norm(dim=1)
            noise = (
                NOISE_FACTOR[st.method] * unit * (u * ev.f0[i].reshape(1, -1)).abs().sum(1) / base
            )
            tol = st.atol + st.rtol * scale + noise
            diff = (ana - num).abs()
            bad = ~(diff <= tol)
            if bool(bad.any()):
                _localize(ev, i, j, an, steps[j], st, unit, acc, diff, tol, ana, num, scale, bad)
                continue
            acc.add(diff, tol, num.abs(), st.atol, constant(st.loc(i, j)))
            if jv_fwd is not None:
                assert fwd is not None
                fa = (u * jv_fwd[i].to(u.dtype)).sum(1)
                # against the finite differences, and against reverse mode (no FD noise)
                for ref, sc, tl in ((num, scale, tol), (ana, ana.abs(), st.atol + st.rtol * scale)):
                    d = (fa - ref).abs()
                    badf = ~(d <= tl)
                    if bool(badf.any()):
                        _localize_forward(
                            ev, i, j, fwd, steps[j], st, unit, acc, d, tl, fa, ref, sc, badf
                        )
                acc.add((fa - num).abs(), tol, num.abs(), st.atol, constant(st.loc(i, j)))
    if fwd is not None:
        st.ran("forward mode")


def _localize(
    ev: Evaluator,
    i: int,
    j: int,
    an: Analytic,
    step: torch.Tensor,
    st: Settings,
    unit: float,
    acc: Acc,
    diff: torch.Tensor,
    tol: torch.Tensor,
    ana: torch.Tensor,
    num: torch.Tensor,
    scale: torch.Tensor,
    bad: torch.Tensor,
) -> None:
    """A probe failed: compare the block in full to name the element (or raise on the probe)."""
    m, n = ev.f0[i].numel(), ev.xs[j].numel()
    if m * n <= _LOCALIZE_LIMIT:
        # Raises on a wrong entry or a kink; returns when every entry passes (then the full
        # comparison, the stricter one per entry, is the verdict) or kinks were skipped.
        a = analytical_jacobian(an, i)[j]
        check_block(ev, i, j, a, fd_all(ev, j, step, st.method)[i], step, st, unit, acc)
        return
    _raise_probe(i, j, st, diff, tol, ana, num, scale, bad, m * n, forward=False)


def _localize_forward(
    ev: Evaluator,
    i: int,
    j: int,
    fwd: Forward,
    step: torch.Tensor,
    st: Settings,
    unit: float,
    acc: Acc,
    diff: torch.Tensor,
    tol: torch.Tensor,
    fa: torch.Tensor,
    ref: torch.Tensor,
    scale: torch.Tensor,
    bad: torch.Tensor,
) -> None:
    m, n = ev.f0[i].numel(), ev.xs[j].numel()
    if m * n <= _LOCALIZE_LIMIT:
        a = fwd.jacobian(j)[i]
        check_block(
            ev, i, j, a, fd_all(ev, j, step, st.method)[i], step, st, unit, acc, forward=True
        )
        return
    _raise_probe(i, j, st, diff, tol, fa, ref, scale, bad, m * n, forward=True)


def _raise_probe(
    i: int,
    j: int,
    st: Settings,
    diff: torch.Tensor,
    tol: torch.Tensor,
    ana: torch.Tensor,
    num: torch.Tensor,
    scale: torch.Tensor,
    bad: torch.Tensor,
    total: int,
    *,
    forward: bool,
) -> None:
    k = int(torch.argmax(torch.where(bad, diff / tol, torch.zeros_like(diff))))
    raise_wrong(
        st.loc(i, j),
        float(ana[k]),
        float(num[k]),
        float(diff[k]),
        float(tol[k]),
        float(scale[k]),
        None,
        total,
        st,
        probe=f" along random signed directions (probe {k + 1} of {st.probes})",
        forward=forward,
    )
