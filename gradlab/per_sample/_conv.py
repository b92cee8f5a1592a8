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

from gradlab.per_sample import _alloc
from gradlab.per_sample._linear import seq_grad, seq_moments, seq_norm_sq
from gradlab.per_sample._registry import Names, Rule, register

__all__ = ["CHUNK_BYTES", "unfold"]

#: Per-sample convolution weight gradients are computed a few samples at a time, so that one
#: call's result is at most this many bytes (one sample at least): on CPU the grouped
#: weight-gradient convolution of a whole batch slows down severalfold once its result outgrows
#: the caches (wide layers at few positions; the ``per_sample`` benchmark suite's CNN at batch
#: 64), and each chunk's temporary reuses the memory its predecessor freed.
CHUNK_BYTES = 4 << 20


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
    shape = (x.shape[0], -1, math.prod(x.shape[2 + n :]))
    if x.is_contiguous():
        return x.view(shape)
    patches = _alloc.empty(tuple(x.shape), dtype=x.dtype, device=x.device)  # written once
    return patches.copy_(x).view(shape)


def _pad(module: Any) -> list[int]:
    return list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]


def _patches(module: Any, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The "linear over positions" view of :func:`_as_conv`'s convolution: ``(B, G, L, I)``
    patches and ``(B, G, L, O)`` output gradients."""
    return _patches_of(module, *_as_conv(module, a, d))


def _patches_of(
    module: Any, inp: torch.Tensor, out: torch.Tensor, padding: list[int]
) -> tuple[torch.Tensor, ...]:
    """:func:`_patches` of the convolution ``out = conv(inp, W)`` (``padding`` zeros)."""
    g = module.groups
    b = inp.shape[0]
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    cols = unfold(inp, module.kernel_size, module.stride, module.dilation, pad, "zeros")
    cols = cols.reshape(b, g, -1, cols.shape[-1]).transpose(-1, -2)
    outs = out.reshape(b, g, out.shape[1] // g, -1).transpose(-1, -2)
    return cols, outs


def _bias_grad(module: Any, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return d.reshape(d.shape[0], d.shape[1], -1).sum(-1)


def _as_conv(module: Any, a: torch.Tensor, d: torch.Tensor) -> tuple[Any, ...]:
    """The layer as a plain zero-padded convolution ``out = conv(inp, W)`` in the weight:
    ``(inp, out, padding)``. A padding mode other than zeros (or an asymmetric ``"same"``) is
    applied to the input here; a transposed convolution is its adjoint (input ``d``, output
    gradient ``a``), so that ``g_i . V = <out_i, conv(inp_i, V)>`` for either. Where an
    ``output_padding`` of at least the stride (allowed below the dilation) gives that convolution
    more positions than ``a`` has, ``a`` is extended by zeros: nothing reaches them."""
    n = len(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        padding = [int(p) for p in module.padding]
        return d, _fit(a, _positions(module, d, padding)), padding
    padding = module.padding
    if module.padding_mode == "zeros" and not isinstance(padding, str):
        return a, d, list(padding)
    pad = _pad(module)
    if any(pad):
        a = F.pad(
            a, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode
        )
    return a, d, [0] * n


def _positions(module: Any, inp: torch.Tensor, padding: list[int]) -> list[int]:
    """The output positions per spatial dimension of the convolution of ``inp`` (``padding``
    zeros on both sides)."""
    return [
        (size + 2 * p - dil * (k - 1) - 1) // s + 1
        for size, p, dil, k, s in zip(
            inp.shape[2:], padding, module.dilation, module.kernel_size, module.stride
        )
    ]


def _fit(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``t`` with ``shape`` positions per spatial dimension: trailing zeros added (or trailing
    positions dropped); ``t`` itself where it has them."""
    if list(t.shape[2:]) == shape:
        return t
    pad = []
    for size, want in zip(reversed(t.shape[2:]), reversed(shape)):
        pad += [0, want - size]
    return F.pad(t, pad)


def _conv(module: Any, inp: torch.Tensor, w: torch.Tensor, padding: list[int]) -> torch.Tensor:
    n = len(module.kernel_size)
    return torch.convolution(
        inp,
        w,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * n,
        module.groups,
    )


def _weight_grad(
    module: Any, inp: torch.Tensor, out: torch.Tensor, padding: list[int], groups: int
) -> torch.Tensor:
    """The weight gradient of ``<out, conv(inp, W)>`` with ``groups`` groups (one weight-gradient
    convolution)."""
    n = len(module.kernel_size)
    w = module.weight
    cout = out.shape[1]
    weight = torch.empty(
        cout, inp.shape[1] // groups, *w.shape[2:], dtype=out.dtype, device=out.device
    )
    _, gw, _ = torch.ops.aten.convolution_backward(
        out,
        inp,
        weight,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * n,
        groups,
        [False, True, False],
    )
    return gw


def _unfold_cheaper(module: Any, out: torch.Tensor) -> bool:
    """Whether the per-sample weight gradients are better formed from the unfolded input, one
    batched matrix product written straight into the result, than by grouped weight-gradient
    convolutions with the samples folded into the groups. ``out`` is the output gradient of the
    layer seen as a convolution (:func:`_as_conv`: a transposed convolution's input).

    The product multiplies ``O x L`` by ``L x I`` per sample and group (``L`` output positions,
    ``O`` output channels per group, ``I`` the patch length); the grouped convolution does the
    same ``O(B L I O)`` arithmetic, and they differ in the memory around it. The unfold first
    writes the patches, ``L x I`` numbers per sample and group (``prod(kernel)`` times the
    input), which the product then reads: nothing to copy for a kernel of one element (the
    patches are the input, or a strided view of it), and at most twice the result where
    ``L <= 2 O``. With more positions the patches outweigh the result and the convolution, which
    never forms them, is the faster; with fewer the batched convolution is the slower, up to
    severalfold (its result, ``B`` weights, goes through the library's blocked weight layout and
    back). The ``per_sample`` benchmark suite's CNN has both kinds of layer."""
    positions = math.prod(out.shape[2:])
    return math.prod(module.kernel_size) == 1 or positions <= 2 * (out.shape[1] // module.groups)


def _chunk(b: int, sample_bytes: int) -> int:
    """Samples per chunk of ``b``, each chunk at most :data:`CHUNK_BYTES` of ``sample_bytes``
    per sample (at least one sample): ``b`` when they all fit, else as many chunks as that takes,
    their sizes as even as they can be."""
    n = max(1, CHUNK_BYTES // max(1, sample_bytes))
    return b if n >= b else -(-b // -(-b // n))


def _per_sample_weight(module: Any, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(B, *weight.shape)`` per-sample weight gradients in one buffer of
    :func:`gradlab.per_sample._alloc.empty`. From unfolded patches where those are small
    (:func:`_unfold_cheaper`), the patches of ``n`` samples at a time (at most
    :data:`CHUNK_BYTES` of them: a temporary no larger than that, read back from the caches)
    and their products written straight into the result; else as convolution weight gradients
    with the samples folded into the groups (``n * groups`` groups: the samples' convolutions
    are independent), ``n`` samples at a time so that each call's result stays small
    (:data:`CHUNK_BYTES`), copied into the result."""
    inp, out, padding = _as_conv(module, a, d)
    b = a.shape[0]
    shape = module.weight.shape
    if _unfold_cheaper(module, out):
        patch = math.prod(out.shape[2:]) * inp.shape[1] * math.prod(module.kernel_size)
        n = _chunk(b, patch * out.element_size())
        if n == b:
            return seq_grad(*_patches_of(module, inp, out, padding)).view(b, *shape)
        g = module.groups
        result = _alloc.empty((b, *shape), dtype=out.dtype, device=out.device)
        for k in range(0, b, n):
            part = result[k : k + n].view(-1, g, shape[0] // g, math.prod(shape[1:]))
            seq_grad(*_patches_of(module, inp[k : k + n], out[k : k + n], padding), out=part)
        return result

    def by_groups(x: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.reshape(1, n * x.shape[1], *x.shape[2:])
        go = go.reshape(1, n * go.shape[1], *go.shape[2:])
        return _weight_grad(module, x, go, padding, n * module.groups).view(n, *shape)

    n = _chunk(b, math.prod(shape) * out.element_size())
    if n == b:
        return by_groups(inp, out)
    result = _alloc.empty((b, *shape), dtype=out.dtype, device=out.device)
    for k in range(0, b, n):
        result[k : k + n] = by_groups(inp[k : k + n], out[k : k + n])
    return result


def _grad(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    out = {}
    if "weight" in names:
        out["weight"] = _per_sample_weight(module, a, d)
    if "bias" in names:
        out["bias"] = _bias_grad(module, a, d)
    return out


def _ghost_cheaper(module: Any, a: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``sum_ll' (a_l.a_l')(d_l.d_l')`` (``O(L^2 (I + O))``) beats forming the
    per-sample gradient (``O(L I O)``): ``2 L^2 < I O`` per group."""
    inp, out, _ = _as_conv(module, a, d)
    g = module.groups
    positions = math.prod(out.shape[2:])
    i = inp.shape[1] // g * math.prod(module.kernel_size)
    return 2 * positions * positions < i * (out.shape[1] // g)


def _by_chunks(fn: Any, a: torch.Tensor, d: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn(a, d)`` of ``chunk`` samples at a time, concatenated (one call for one chunk)."""
    b = a.shape[0]
    if chunk >= b:
        return fn(a, d)
    return torch.cat([fn(a[k : k + chunk], d[k : k + chunk]) for k in range(0, b, chunk)])


def _norm_sq(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    out = {}
    if "weight" in names:
        b = a.shape[0]
        if _ghost_cheaper(module, a, d):
            # the patches are prod(kernel) times the input: unfolded a few samples at a time
            chunk = max(1, b // max(1, math.prod(module.kernel_size)))
            out["weight"] = _by_chunks(
                lambda a, d: seq_norm_sq(*_patches(module, a, d)), a, d, chunk
            )
        else:
            # formed a few samples at a time: each chunk's per-sample gradients are no larger
            # than the layer's input, which autograd holds anyway (the norms step's peak memory
            # stays that of a plain step)
            chunk = max(1, a.numel() // max(1, module.weight.numel()))
            out["weight"] = _by_chunks(
                lambda a, d: _per_sample_weight(module, a, d).flatten(1).square().sum(1),
                a,
                d,
                chunk,
            )
    if "bias" in names:
        out["bias"] = _bias_grad(module, a, d).square().sum(1)
    return out


def _dot(
    module: Any, a: torch.Tensor, d: torch.Tensor, v: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``g_i . V = <out_i, conv(inp_i, V)>``: one convolution of the batch with ``V`` as the
    weight and a per-sample inner product, no per-sample gradient."""
    result = torch.zeros(a.shape[0], dtype=d.dtype, device=d.device)
    if "weight" in v:
        inp, out, padding = _as_conv(module, a, d)
        y = _conv(module, inp, v["weight"].to(d.dtype), padding)
        result = result + (y * out).flatten(1).sum(1)
    if "bias" in v:
        result = result + _bias_grad(module, a, d) @ v["bias"].to(d.dtype)
    return result


def _dot_mean(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict | None:
    """``g_i . m`` with ``m = (1/B) sum_k g_k`` per parameter, without per-sample weight
    gradients: ``m`` by one weight-gradient convolution of the batch, then :func:`_dot`'s
    convolution. ``None`` (form them) where they are no larger than the layer's activations."""
    b = a.shape[0]
    out = {}
    if "weight" in names:
        if b * module.weight.numel() <= a.numel() + d.numel():
            return None
        inp, go, padding = _as_conv(module, a, d)
        mean = _weight_grad(module, inp, go, padding, module.groups) / b
        out["weight"] = _dot(module, a, d, {"weight": mean})
    if "bias" in names:
        db = _bias_grad(module, a, d)
        out["bias"] = db @ db.mean(0)
    return out


def _moments(
    module: Any, a: torch.Tensor, d: torch.Tensor, names: Names, with_sum: bool
) -> dict | None:
    out_grad = a if isinstance(module, nn.modules.conv._ConvTransposeNd) else d
    if math.prod(out_grad.shape[2:]) != 1:  # shape arithmetic: indexing makes a view (~10 us)
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
        out["bias"] = (db.sum(0) if with_sum else None, db.square().sum(0))
    return out


_RULE = Rule(grad=_grad, norm_sq=_norm_sq, dot=_dot, moments=_moments, dot_mean=_dot_mean)
for _cls in (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
):
    register(_cls, _RULE)
