"""nn.Linear (any number of leading dimensions), and the grouped "linear over positions" algebra
that the convolutions reuse.

With ``a_t`` the input and ``d_t`` the output gradient at position ``t`` of one sample, the
weight gradient is ``G = sum_t d_t a_t^T``. Its squared norm without forming ``G`` (Goodfellow
2015; Li et al. 2022 and Bu et al. 2023 for sequences, "mixed ghost clipping")::

    ||G||^2 = ||a||^2 ||d||^2                       (one position)
    ||G||^2 = sum_{t,t'} (a_t . a_t') (d_t . d_t')   (T positions: O(T^2 (I + O)))

used where ``2 T^2 < I O``; otherwise ``G`` is formed and dropped at once (O(T I O)). The dot
product with a matrix ``V`` is ``sum_t d_t^T V a_t``, never forming ``G``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradlab.per_sample import _alloc
from gradlab.per_sample._registry import Names, Rule, register

__all__ = ["seq_dot", "seq_grad", "seq_moments", "seq_norm_sq"]


def seq_grad(a: torch.Tensor, d: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a (B, G, T, I)``, ``d (B, G, T, O)`` -> per-sample ``(B, G, O, I)``, written into
    ``out`` (contiguous, of that shape) if given, else into a buffer of
    :func:`gradlab.per_sample._alloc.empty` (huge pages where they can be had).

    One position: an outer product by broadcasting (a batched matrix product with an inner
    dimension of 1 writes the same ``B O I`` numbers about 8% slower on CPU). Differentiable
    (no preallocated buffer unless ``out`` is given) when called on tensors that require
    gradients."""
    if torch.is_grad_enabled() and (a.requires_grad or d.requires_grad):
        if a.shape[2] == 1:
            grads = d[:, :, 0, :, None] * a[:, :, 0, None, :]
        else:
            grads = d.transpose(-1, -2) @ a
        return grads if out is None else out.copy_(grads)
    b, g, _, i = a.shape
    dtype = torch.promote_types(a.dtype, d.dtype)
    if out is None:
        out = _alloc.empty((b, g, d.shape[3], i), dtype=dtype, device=d.device)
    if a.shape[2] == 1:
        return torch.mul(d[:, :, 0, :, None], a[:, :, 0, None, :], out=out)
    t, o = a.shape[2], d.shape[3]
    torch.bmm(
        d.transpose(-1, -2).reshape(b * g, o, t).to(dtype),
        a.reshape(b * g, t, i).to(dtype),
        out=out.view(b * g, o, i),
    )
    return out


def seq_norm_sq(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared Frobenius norms of :func:`seq_grad` summed over groups, ghost if cheaper."""
    t, i, o = a.shape[2], a.shape[3], d.shape[3]
    if t == 1:
        na = torch.linalg.vector_norm(a, dim=(2, 3))
        nd = torch.linalg.vector_norm(d, dim=(2, 3))
        return (na * nd).square().sum(1)
    if 2 * t * t < i * o:
        aa = a @ a.transpose(-1, -2)
        dd = d @ d.transpose(-1, -2)
        return (aa * dd).sum((1, 2, 3))
    # Formed and dropped at once. Here 2 T^2 >= I O, so T (I + O) >= 2 T sqrt(I O) > I O: the
    # per-sample gradients are never larger than the layer's input and output gradient.
    return seq_grad(a, d).square().sum((1, 2, 3))


def seq_dot(a: torch.Tensor, d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``sum_g <G_bg, v_g>`` for ``v (G, O, I)``, without forming ``G``."""
    return ((d @ v) * a).sum((1, 2, 3))


def seq_moments(
    a: torch.Tensor, d: torch.Tensor, with_sum: bool
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """``(sum_b G_b, sum_b G_b**2)`` of shape ``(G, O, I)`` for one position, else ``None``;
    the sum only ``with_sum``. Two GEMMs of the weight gradient's size, no per-sample tensor."""
    if a.shape[2] != 1:
        return None
    a2, d2 = a[:, :, 0].transpose(0, 1), d[:, :, 0].permute(1, 2, 0)  # (G, B, I), (G, O, B)
    total = d2 @ a2 if with_sum else None
    sq = d2.square() @ a2.square()
    return total, sq


def _flat(module: Any, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b = a.shape[0]
    return a.reshape(b, 1, -1, a.shape[-1]), d.reshape(b, 1, -1, d.shape[-1])


def _grad(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    a4, d4 = _flat(module, a, d)  # type: ignore[arg-type]
    out = {}
    if "weight" in names:
        out["weight"] = seq_grad(a4, d4)[:, 0]
    if "bias" in names:
        out["bias"] = d4[:, 0].sum(1)
    return out


def _norm_sq(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    out = {}
    if a.dim() == 2:  # one position: ||g_i||^2 = ||a_i||^2 ||d_i||^2, ||d_i||^2 for the bias
        # (vecdot: one op per squared norm where vector_norm and square are two)
        nd = torch.linalg.vecdot(d, d)
        if "weight" in names:
            out["weight"] = torch.linalg.vecdot(a, a).mul_(nd)
        if "bias" in names:
            out["bias"] = nd
        return out
    a4, d4 = _flat(module, a, d)  # type: ignore[arg-type]
    if "weight" in names:
        out["weight"] = seq_norm_sq(a4, d4)
    if "bias" in names:
        out["bias"] = d4[:, 0].sum(1).square().sum(1)
    return out


def _dot(
    module: Any, a: torch.Tensor, d: torch.Tensor, v: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    a4, d4 = _flat(module, a, d)  # type: ignore[arg-type]
    out = torch.zeros(a4.shape[0], dtype=a4.dtype, device=a4.device)
    if "weight" in v:
        out = out + seq_dot(a4, d4, v["weight"].to(a4.dtype)[None])
    if "bias" in v:
        out = out + d4[:, 0].sum(1) @ v["bias"].to(d4.dtype)
    return out


def _moments(
    module: Any, a: torch.Tensor, d: torch.Tensor, names: Names, with_sum: bool
) -> dict | None:
    if a.dim() == 2:  # one position, no groups: plain GEMMs
        out = {}
        d_sq = d.square()
        if "weight" in names:
            out["weight"] = (d.t() @ a if with_sum else None, d_sq.t() @ a.square())
        if "bias" in names:
            out["bias"] = (d.sum(0) if with_sum else None, d_sq.sum(0))
        return out
    a4, d4 = _flat(module, a, d)
    m = seq_moments(a4, d4, with_sum)
    if m is None:
        return None
    out = {}
    if "weight" in names:
        out["weight"] = (None if m[0] is None else m[0][0], m[1][0])
    if "bias" in names:
        db = d4[:, 0, 0]
        out["bias"] = (db.sum(0) if with_sum else None, db.square().sum(0))
    return out


def _dot_mean(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    """``g_i . m`` per parameter, ``m = (1/B) sum_k g_k``. One position: with Gram matrices,
    ``g_i . g_k = (a_i . a_k)(d_i . d_k)``, so ``g_i . m = (1/B) sum_k (a_i . a_k)(d_i . d_k)``
    (``O(B^2 (I + O))``) where that beats ``m`` first and ``d_i^T m a_i`` (two GEMMs,
    ``O(B I O)`` each); sequences: the latter."""
    b, i, o = a.shape[0], a.shape[-1], d.shape[-1]
    out = {}
    if a.dim() == 2:  # one position: the Gram matrices, or m first
        if b * (i + o) <= 2 * i * o:
            dd = d @ d.t()
            if "weight" in names:
                out["weight"] = (a @ a.t()).mul_(dd).mean(1)
            if "bias" in names:
                out["bias"] = dd.mean(1)
            return out
        if "weight" in names:
            out["weight"] = ((d @ ((d.t() @ a) / b)) * a).sum(1)
        if "bias" in names:
            out["bias"] = d @ d.mean(0)
        return out
    a4, d4 = _flat(module, a, d)
    t = a4.shape[2]
    db = d4[:, 0, 0] if t == 1 else d4[:, 0].sum(1)  # (B, O): the per-sample bias gradients
    if "weight" in names:
        if t == 1 and b * (i + o) <= 2 * i * o:
            a2 = a4[:, 0, 0]
            out["weight"] = ((a2 @ a2.T) * (db @ db.T)).mean(1)
        else:
            m = torch.einsum("bgto,bgti->goi", d4, a4) / b
            out["weight"] = seq_dot(a4, d4, m)
    if "bias" in names:
        out["bias"] = db @ db.mean(0)
    return out


register(
    nn.Linear,
    Rule(grad=_grad, norm_sq=_norm_sq, dot=_dot, moments=_moments, dot_mean=_dot_mean),
)
