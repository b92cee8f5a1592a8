"""nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (stride, padding and its modes, dilation, groups).

A convolution is a linear layer applied at every output position ``l`` to the unfolded input
patch ``a_l`` (channels x kernel of one group), so the per-sample weight gradient of group ``g``
is ``sum_l d_gl a_gl^T`` and the rules of :mod:`gradlab.per_sample._linear` apply with
``T = L`` positions (ghost norms where ``2 L^2 < I O``). The unfold works for any number of
spatial dimensions (``Tensor.unfold`` per dimension, a view until the final reshape).

A transposed convolution is the adjoint of the convolution with the same hyper-parameters, so
``<conv_transpose_W(x), d> = <x, conv_W(d)>``: its weight gradient is that of a convolution whose
input is the output gradient ``d`` and whose output gradient is the input ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.per_sample._linear import seq_dot, seq_grad, seq_moments, seq_norm_sq
from gradlab.per_sample._registry import Names, Rule, register

__all__ = ["unfold"]


def unfold(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    pad: list[int],
    mode: str,
) -> torch.Tensor:
    """``x (B, C, *S)`` -> patches ``(B, C * prod(kernel), L)``, channel-major as a conv weight.

    ``pad`` is in :func:`torch.nn.functional.pad` order (last dimension first).
    """
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    n = len(kernel)
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # (B, C, *out, *k) -> (B, C, *k, *out)
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(x.shape[0], -1, math.prod(x.shape[2 + n :]))


def _pad(module: Any) -> list[int]:
    return list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]


def _patches(module: Any, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The "linear over positions" view: ``(B, G, L, I)`` patches and ``(B, G, L, O)`` grads."""
    g = module.groups
    b = a.shape[0]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        inp, out = d, a  # the adjoint convolution: input d, output gradient a
        pad = []
        for p in reversed(module.padding):
            pad += [p, p]
        mode = "zeros"
    else:
        inp, out = a, d
        pad, mode = _pad(module), module.padding_mode  # type: ignore[assignment]
    cols = unfold(inp, module.kernel_size, module.stride, module.dilation, pad, mode)  # type: ignore[arg-type]
    cols = cols.reshape(b, g, -1, cols.shape[-1]).transpose(-1, -2)
    outs = out.reshape(b, g, out.shape[1] // g, -1).transpose(-1, -2)
    return cols, outs


def _bias_grad(module: Any, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return d.reshape(d.shape[0], d.shape[1], -1).sum(-1)


def _grad_by_groups(module: Any, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    """Per-sample weight gradients as one convolution weight gradient with the batch folded
    into the groups (``B * groups`` groups: the samples' convolutions are independent), without
    unfolding; ``None`` where the layer pads by other means than zeros or asymmetrically."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) or module.padding_mode != "zeros":
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = (0,) * len(module.kernel_size)
    b, w = a.shape[0], module.weight
    x = a.reshape(1, b * a.shape[1], *a.shape[2:])
    go = d.reshape(1, b * d.shape[1], *d.shape[2:])
    weight = torch.empty(b * w.shape[0], *w.shape[1:], dtype=d.dtype, device=d.device)
    _, gw, _ = torch.ops.aten.convolution_backward(
        go,
        x,
        weight,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0] * len(module.kernel_size),
        b * module.groups,
        [False, True, False],
    )
    return gw.reshape(b, *w.shape)


def _grad(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    out = {}
    if "weight" in names:
        w = module.weight
        g = _grad_by_groups(module, a, d)
        if g is None:
            cols, outs = _patches(module, a, d)
            g = seq_grad(cols, outs).reshape(a.shape[0], *w.shape)
        out["weight"] = g
    if "bias" in names:
        out["bias"] = _bias_grad(module, a, d)
    return out


def _norm_sq(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    out = {}
    if "weight" in names:
        # the patches are prod(kernel) times the input: unfolded a few samples at a time
        b = a.shape[0]
        chunk = max(1, b // max(1, math.prod(module.kernel_size)))
        out["weight"] = torch.cat(
            [
                seq_norm_sq(*_patches(module, a[k : k + chunk], d[k : k + chunk]))
                for k in range(0, b, chunk)
            ]
        )
    if "bias" in names:
        out["bias"] = _bias_grad(module, a, d).square().sum(1)
    return out


def _dot(
    module: Any, a: torch.Tensor, d: torch.Tensor, v: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    result = torch.zeros(a.shape[0], dtype=d.dtype, device=d.device)
    if "weight" in v:
        cols, outs = _patches(module, a, d)
        g = module.groups
        vw = v["weight"].to(d.dtype).reshape(g, outs.shape[-1], cols.shape[-1])
        result = result + seq_dot(cols, outs, vw)
    if "bias" in v:
        result = result + _bias_grad(module, a, d) @ v["bias"].to(d.dtype)
    return result


def _moments(
    module: Any, a: torch.Tensor, d: torch.Tensor, names: Names, with_sum: bool
) -> dict | None:
    if (d if not isinstance(module, nn.modules.conv._ConvTransposeNd) else a)[0, 0].numel() != 1:
        return None  # several positions: no cheaper closed form than the per-sample gradients
    cols, outs = _patches(module, a, d)
    m = seq_moments(cols, outs, with_sum)
    if m is None:
        return None
    out = {}
    if "weight" in names:
        shape = module.weight.shape
        total = None if m[0] is None else m[0].reshape(shape)
        out["weight"] = (total, m[1].reshape(shape))
    if "bias" in names:
        db = _bias_grad(module, a, d)
        out["bias"] = (db.sum(0), db.square().sum(0))
    return out


_RULE = Rule(grad=_grad, norm_sq=_norm_sq, dot=_dot, moments=_moments)
for _cls in (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
):
    register(_cls, _RULE)
