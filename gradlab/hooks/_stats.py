"""Gradient statistics for GradientMonitor: (L2, L1, min, max) of many gradients at once."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CpuStats", "stats_fused"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SCRATCH_MAX = 2**20  # elements: larger CPU gradients use a fresh buffer for |g|


def stats_fused(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """(L2, L1, min, max) of each gradient with three fused ``_foreach_norm`` launches.

    The Linf norm stands for both ``-min`` and ``max`` (only ``max |g|`` is reported); it
    propagates NaN, so a gradient is finite exactly when its Linf norm is. float16/bfloat16
    gradients are reduced in float32 (their L1 norm overflows float16 for 66k entries of 1).
    """
    low = [i for i, g in enumerate(grads) if g.dtype in _LOW_PRECISION]
    if not low:
        return _fused(grads, None)
    if len(low) == len(grads):
        return _fused(grads, torch.float32)
    rest = [i for i, g in enumerate(grads) if g.dtype not in _LOW_PRECISION]
    parts = (
        (low, _fused([grads[i] for i in low], torch.float32)),
        (rest, _fused([grads[i] for i in rest], None)),
    )
    out: tuple[list[Any], ...] = tuple([None] * len(grads) for _ in range(4))
    for idx, stats in parts:
        for column, values in zip(out, stats):
            for i, v in zip(idx, values):
                column[i] = v
    return out


def _fused(grads: list[torch.Tensor], dtype: torch.dtype | None) -> tuple[list[torch.Tensor], ...]:
    if any(g.numel() == 0 for g in grads):  # the Linf norm of an empty tensor is undefined
        full = [i for i, g in enumerate(grads) if g.numel()]
        stats = _fused([grads[i] for i in full], dtype) if full else ([], [], [], [])
        zero = grads[0].new_zeros((), dtype=dtype or grads[0].dtype)
        out: tuple[list[torch.Tensor], ...] = tuple([zero] * len(grads) for _ in range(4))
        for column, values in zip(out, stats):
            for i, v in zip(full, values):
                column[i] = v
        return out
    if dtype is not None:
        try:
            norms = [list(torch._foreach_norm(grads, o, dtype=dtype)) for o in (2, 1, math.inf)]
        except TypeError:  # torch without dtype= on _foreach_norm: upcast
            grads = [g.to(dtype) for g in grads]
            norms = [list(torch._foreach_norm(grads, o)) for o in (2, 1, math.inf)]
    else:
        norms = [list(torch._foreach_norm(grads, o)) for o in (2, 1, math.inf)]
    l2, l1, hi = norms
    return l2, l1, list(torch._foreach_neg(hi)), hi


class CpuStats:
    """Statistics of CPU gradients, grouped by size to save per-op dispatch.

    On CPU the L1/Linf foreach kernels are not vectorised (measured 6x / 17x slower than L2) and
    every op costs microseconds of dispatch, so gradients of equal size and dtype (the layers of
    an MLP, a stage of a CNN, their biases) are copied into rows of one reused scratch matrix and
    reduced row-wise: ``vector_norm``, ``amax``, ``amin`` (both NaN-propagating; max |g| is
    ``max(-min, max)``), ``abs_`` and ``sum``. A lone gradient gets ``vector_norm``, ``aminmax``
    and ``abs`` into the scratch buffer followed by ``sum``.
    """

    __slots__ = ("_scratch",)

    def __init__(self) -> None:
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._scratch[dtype] = torch.empty(max(n, 2**16), dtype=dtype)
        return buf[:n]

    def __call__(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """(4, k) chunks of (L2, L1, min, max) columns, and the gradients' order in them."""
        groups: dict[tuple[int, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault((g.numel(), g.dtype), []).append(i)
        chunks, order = [], []
        for (n, dtype), idx in groups.items():
            acc = torch.float32 if dtype in _LOW_PRECISION else None
            k = len(idx)
            if n == 0:
                chunks.append(torch.zeros(4, k, dtype=acc or dtype))
            elif k == 1:
                flat = grads[idx[0]].reshape(-1)
                lo, hi = torch.aminmax(flat)
                if n <= _SCRATCH_MAX:
                    a = torch.abs(flat, out=self._buffer(dtype, n))
                else:
                    a = flat.abs()
                l2 = torch.linalg.vector_norm(flat, dtype=acc)
                chunks.append(torch.stack([l2, a.sum(dtype=acc), lo, hi]).view(4, 1))
            else:
                rows = [grads[i].reshape(-1) for i in idx]
                if k * n <= _SCRATCH_MAX:
                    m = torch.stack(rows, out=self._buffer(dtype, k * n).view(k, n))
                else:
                    m = torch.stack(rows)
                l2 = torch.linalg.vector_norm(m, dim=1, dtype=acc)
                lo, hi = m.amin(dim=1), m.amax(dim=1)
                l1 = m.abs_().sum(dim=1, dtype=acc)
                chunks.append(torch.stack([l2, l1, lo, hi]))
            order.extend(idx)
        return chunks, order
