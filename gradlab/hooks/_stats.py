"""Gradient statistics for GradientMonitor: (sum of squares, L1, max |g|) of many gradients.

Three numbers per gradient ``g``: ``sum(g**2)`` (the squared L2 norm; the host takes the square
root, which lets the calls of a module be combined exactly), ``sum|g|`` and ``max|g|``. All three
propagate NaN, and ``max|g|`` is non-finite exactly when ``g`` holds a NaN or an Inf, so it doubles
as the NaN/Inf detector (no separate ``isfinite`` pass). float16/bfloat16 gradients are reduced
in float32 (their L1 norm overflows float16 for 66k entries of 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["ROWS", "CpuStats", "stats_fused"]

ROWS = 3  # sum of squares, L1 norm, max |g|
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SCRATCH_MAX = 2**20  # elements: larger CPU gradients use a fresh buffer for |g|


def stats_fused(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """(sum of squares, L1, max |g|) of each gradient with fused ``_foreach_norm`` launches.

    The Linf norm propagates NaN, so a gradient is finite exactly when its Linf norm is.
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
    out: tuple[list[Any], ...] = tuple([None] * len(grads) for _ in range(ROWS))
    for idx, stats in parts:
        for column, values in zip(out, stats):
            for i, v in zip(idx, values):
                column[i] = v
    return out


def _fused(grads: list[torch.Tensor], dtype: torch.dtype | None) -> tuple[list[torch.Tensor], ...]:
    if any(g.numel() == 0 for g in grads):  # the Linf norm of an empty tensor is undefined
        full = [i for i, g in enumerate(grads) if g.numel()]
        stats = _fused([grads[i] for i in full], dtype) if full else ([], [], [])
        zero = grads[0].new_zeros((), dtype=dtype or grads[0].dtype)
        out: tuple[list[torch.Tensor], ...] = tuple([zero] * len(grads) for _ in range(ROWS))
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
    return list(torch._foreach_mul(l2, l2)), l1, hi


class CpuStats:
    """Statistics of CPU gradients: one at a time, or grouped by size to save per-op dispatch.

    On CPU the L1/Linf foreach kernels are not vectorised (measured 6x / 17x slower than L2), so
    the three numbers come from vectorised ops: ``|g|`` into a reused scratch buffer, then
    ``vector_norm`` (or ``dot`` for one gradient), ``sum`` and ``amax`` of it.

    * :meth:`one`: a single gradient, four ops and no copy; used for large gradients straight
      from the tensor hook, while the gradient is still in cache and before the engine frees it.
    * ``__call__``: gradients of equal size and dtype (the small layers of an MLP, their biases)
      are copied into rows of one scratch matrix and reduced row-wise, five ops per group.
    """

    __slots__ = ("_scratch",)

    def __init__(self) -> None:
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._scratch[dtype] = torch.empty(max(n, 2**16), dtype=dtype)
        return buf[:n]

    def one(self, g: torch.Tensor) -> list[torch.Tensor]:
        """[sum of squares, L1, max |g|] of one non-empty CPU gradient, as 0-dim tensors."""
        flat = g.reshape(-1)
        n = flat.numel()
        a = torch.abs(flat, out=self._buffer(g.dtype, n)) if n <= _SCRATCH_MAX else flat.abs()
        if g.dtype in _LOW_PRECISION:
            sq = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
            return [sq, a.sum(dtype=torch.float32), a.amax().float()]
        return [torch.dot(flat, flat), a.sum(), a.amax()]

    def __call__(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """(3, k) chunks of (sum of squares, L1, max |g|) columns, and the gradients' order."""
        groups: dict[tuple[int, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault((g.numel(), g.dtype), []).append(i)
        chunks, order = [], []
        for (n, dtype), idx in groups.items():
            acc = torch.float32 if dtype in _LOW_PRECISION else None
            k = len(idx)
            if n == 0:
                chunks.append(torch.zeros(ROWS, k, dtype=acc or dtype))
            elif k == 1:
                chunks.append(torch.stack(self.one(grads[idx[0]])).view(ROWS, 1))
            else:
                rows = [grads[i].reshape(-1) for i in idx]
                if k * n <= _SCRATCH_MAX:
                    m = torch.stack(rows, out=self._buffer(dtype, k * n).view(k, n))
                else:
                    m = torch.stack(rows)
                m.abs_()
                sq = torch.linalg.vector_norm(m, dim=1, dtype=acc).square_()
                l1 = m.sum(dim=1, dtype=acc)
                hi = m.amax(dim=1)
                chunks.append(torch.stack([sq, l1, hi if acc is None else hi.to(acc)]))
            order.extend(idx)
        return chunks, order
