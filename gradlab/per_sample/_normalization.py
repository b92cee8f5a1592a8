"""nn.LayerNorm, nn.GroupNorm and nn.RMSNorm (where torch has it): per-sample affine gradients.

Each normalises within one sample, ``y = x_hat * w + b``, so the per-sample gradients are
``g_w = sum_pos d * x_hat`` and ``g_b = sum_pos d`` over the positions sharing an affine entry,
with ``x_hat`` recomputed from the captured input (biased variance, the layer's ``eps``). The
gradients are as small as the affine parameters: norms, moments and dot products come from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradlab.per_sample._registry import Names, Rule, register


def _affine(d: torch.Tensor, x_hat: torch.Tensor | None, k: int, names: Names) -> dict:
    """Sum ``d * x_hat`` (weight) and ``d`` (bias) over the dimensions between 0 and the last
    ``k``; ``x_hat`` None: the input needs no normalisation for the bias alone."""
    dims = tuple(range(1, d.dim() - k))
    out = {}
    if "weight" in names:
        assert x_hat is not None
        out["weight"] = (d * x_hat).sum(dims) if dims else d * x_hat
    if "bias" in names:
        out["bias"] = d.sum(dims) if dims else d
    return out


def _layer_norm(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    k = len(module.normalized_shape)  # type: ignore[union-attr,arg-type]
    dims = tuple(range(a.dim() - k, a.dim()))
    a = a.to(d.dtype)
    mean = a.mean(dims, keepdim=True)
    var = a.var(dims, keepdim=True, unbiased=False)
    x_hat = (a - mean) * torch.rsqrt(var + module.eps)  # type: ignore[operator]
    return _affine(d, x_hat, k, names)


def _rms_norm(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    k = len(module.normalized_shape)  # type: ignore[union-attr,arg-type]
    dims = tuple(range(a.dim() - k, a.dim()))
    a = a.to(d.dtype)
    eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps  # type: ignore[union-attr]
    x_hat = a * torch.rsqrt(a.square().mean(dims, keepdim=True) + eps)  # type: ignore[operator]
    return _affine(d, x_hat, k, names)


def _group_norm(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    b, c = a.shape[0], a.shape[1]
    g = module.num_groups  # type: ignore[union-attr]
    x = a.to(d.dtype).reshape(b, g, -1)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    x_hat = ((x - mean) * torch.rsqrt(var + module.eps)).reshape(a.shape)  # type: ignore[operator]
    # channels are dimension 1: move them last to reuse _affine
    dm = d.reshape(b, c, -1).transpose(1, 2)
    xm = x_hat.reshape(b, c, -1).transpose(1, 2)
    return _affine(dm, xm, 1, names)


register(nn.LayerNorm, Rule(grad=_layer_norm))
register(nn.GroupNorm, Rule(grad=_group_norm))
if hasattr(nn, "RMSNorm"):
    register(nn.RMSNorm, Rule(grad=_rms_norm))
