"""The per-sample Hessian of a loss w.r.t. a network's output, for :mod:`._backprop`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradlab.curvature._losses import ce_root


def _output_hessian(
    loss: torch.Tensor, out: torch.Tensor, N: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample Hessian (N, C, C) and gradient (N, C) of the loss w.r.t. the chain's output,
    or None when the loss is not separable over samples (rows) or does not use the output."""
    C = out.numel() // N
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss.sum(), out, create_graph=True, allow_unused=True)
    if g is None:
        return None
    if not g.requires_grad:  # loss linear in the output
        return out.new_zeros(N, C, C), g.detach().reshape(N, C)
    # columns e_c of every sample's block, and a probe that checks separability: random on a
    # random half of the samples, zero on the others (seeded; the global RNG is not touched)
    gen = torch.Generator(device=out.device).manual_seed(0)
    probe = torch.randn((N, C), generator=gen, device=out.device, dtype=out.dtype)
    half = torch.randperm(N, generator=gen, device=out.device)[: (N + 1) // 2]
    on = torch.zeros(N, dtype=torch.bool, device=out.device)
    on[half] = True
    probe[~on] = 0
    V = torch.cat(
        [
            torch.eye(C, dtype=out.dtype, device=out.device).unsqueeze(1).expand(C, N, C),
            probe.unsqueeze(0),
        ]
    )
    try:  # one batched double backward through the loss part
        (HV,) = torch.autograd.grad(
            g,
            out,
            V.reshape(C + 1, *out.shape),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:  # an op without a batching rule: one product at a time
        cols = [
            torch.autograd.grad(g, out, v.reshape(out.shape), retain_graph=True, allow_unused=True)[
                0
            ]
            for v in V
        ]
        HV = None if cols[0] is None else torch.stack(cols)
    if HV is None:
        return out.new_zeros(N, C, C), g.detach().reshape(N, C)
    HV = HV.reshape(C + 1, N, C)
    H = HV[:C].permute(1, 2, 0)  # H[n, :, c] = column c of sample n's block
    H = (H + H.mT) / 2
    hv = HV[C]
    if hv[~on].any():  # samples without probe entries got some: exactly zero if separable
        return None
    block = torch.einsum("nij,nj->ni", H, probe)
    eps = torch.finfo(out.dtype).eps
    scale = torch.einsum("nij,nj->ni", H.abs(), probe.abs()).norm()
    if (hv - block).norm() > 1e3 * eps * (scale + hv.norm()):
        return None  # coupling among the probed samples
    return H, g.detach().reshape(N, C)


def _cross_entropy_hessian(
    loss: torch.Tensor, out: torch.Tensor, N: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    r"""Closed form when the loss is exactly ``F.cross_entropy(out, target)`` of a 2-d output
    (``nll_loss(log_softmax(out, 1))``, mean or sum, class weights and ``ignore_index`` allowed;
    no label smoothing; reshapes of the scalar loss are looked through):
    C - 1 columns :math:`R_{na} = \sqrt{w_n}\, s_a(p_n)` of a square root of
    :math:`H_n = w_n(\operatorname{diag} p_n - p_n p_n^\top) = \sum_a R_{na} R_{na}^\top`
    (:func:`~gradlab.curvature._losses.ce_root`; BackPACK uses C), as ``(N, C - 1, C)``, and
    :math:`g_n = w_n (p_n - e_{y_n})`. None for anything else (then autograd finds them)."""
    nll: Any = loss.grad_fn
    while type(nll).__name__ == "ViewBackward0":  # a reshape of the scalar (one element)
        nll = nll.next_functions[0][0]
    if type(nll).__name__ != "NllLossBackward0" or out.dim() != 2 or out.shape[0] != N:
        return None
    lsm: Any = nll.next_functions[0][0]
    if (
        type(lsm).__name__ != "LogSoftmaxBackward0"
        or lsm._saved_dim not in (1, -1)
        or lsm.next_functions[0][0] is not out.grad_fn
        or nll._saved_reduction not in (1, 2)
    ):
        return None
    target = nll._saved_target
    if target.shape != (N,):
        return None
    p = lsm._saved_result.detach().exp()
    ignore = nll._saved_ignore_index
    ignore = ignore - 2**64 if ignore >= 2**63 else ignore
    keep = target != ignore
    y = torch.where(keep, target, 0)
    weight = nll._saved_weight
    w = (torch.ones_like(p[:, 0]) if weight is None else weight[y].to(p.dtype)) * keep
    if nll._saved_reduction == 1:
        w = w / nll._saved_total_weight
    if bool((w < 0).any()):
        return None
    g = (p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)) * w.unsqueeze(1)
    # R[n, a] = sqrt(w_n) s_a(p_n), a < C - 1: sum_a R[n, a, i] R[n, a, j] = H_n[i, j]
    R = ce_root(p).movedim(0, 1) * w.sqrt().reshape(-1, 1, 1)
    return R, g
