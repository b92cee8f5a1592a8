"""Gradient statistics for GradientMonitor: (sum of squares, L1, max |g|) of many gradients.

Three numbers per gradient ``g``: ``sum(g**2)`` (the squared L2 norm; the host takes the square
root, which lets the calls of a module be combined exactly), ``sum|g|`` and ``max|g|``. All three
propagate NaN, and ``max|g|`` is non-finite exactly when ``g`` holds a NaN or an Inf, so it doubles
as the NaN/Inf detector (no separate ``isfinite`` pass). float16/bfloat16 gradients are reduced
in float32 (their L1 norm overflows float16 for 66k entries of 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

try:  # optional (the ``fast`` extra): BLAS level 1 through SciPy for CPU gradients
    from scipy.linalg import blas as _blas
except ImportError:  # pragma: no cover - depends on the environment
    _blas = None

__all__ = [
    "ROWS",
    "CpuArena",
    "DistScratch",
    "GsnrScratch",
    "as_float64",
    "blas_stats",
    "blas_sum_sq",
    "stats_fused",
]

ROWS = 3  # sum of squares, L1 norm, max |g|
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SCRATCH_MAX = 2**20  # elements: larger CPU gradients use a fresh buffer for |g|
_SMALL = 4096  # elements: smaller CPU gradients are kept by reference until the flush


_BLAS: dict[torch.dtype, tuple[Callable[..., Any], ...]] = (
    {
        torch.float32: (_blas.sdot, _blas.sasum, _blas.isamax),
        torch.float64: (_blas.ddot, _blas.dasum, _blas.idamax),
    }
    if _blas is not None
    else {}
)
_BLAS_MAX = 2**31 - 1  # entries: SciPy's BLAS wrappers take 32-bit sizes


def blas_stats(g: torch.Tensor) -> tuple[float, float, float] | None:
    """(sum of squares, L1, max |g|) of a CPU gradient by three BLAS level-1 calls, or None.

    ``dot(g, g)``, ``asum(g)`` and ``g[iamax(g)]``: three reads of ``g`` while it is in cache,
    no write, no temporary and no torch op, about 3x faster than the fastest sequence of torch
    ops (which must write ``|g|`` somewhere: no torch op reads ``|g|`` without materialising it,
    except slow ones). ``iamax`` skips NaN, the dot does not, so a NaN anywhere makes max |g| NaN
    as ``amax`` would. Accumulation is in the gradient's precision (float32 for float32), like
    the torch ops'. Needs SciPy (``pip install gradlab[fast]``); returns ``None`` without it, or
    when ``g`` is not a contiguous, plain (no conjugate/negative bit) float32/float64 CPU tensor
    with 1 to 2**31 - 1 entries.
    """
    found = _blas_view(g)
    if found is None:
        return None
    (dot, asum, iamax), a = found
    sq = float(dot(a, a))
    hi = abs(float(a[iamax(a)])) if sq == sq else math.nan
    return sq, float(asum(a)), hi


def blas_sum_sq(g: torch.Tensor) -> float | None:
    """``sum(g**2)`` of a CPU gradient by one BLAS dot (no torch op), or None where
    :func:`blas_stats` would return None."""
    found = _blas_view(g)
    return None if found is None else float(found[0][0](found[1], found[1]))


def as_float64(values: list[Any], device: Any) -> torch.Tensor:
    """``(len(values),)`` float64 tensor on ``device`` of Python floats (one tensor, no op per
    value, where all are floats) and 0-dim tensors; a float is never rounded through float32
    (``torch.as_tensor`` of a float would)."""
    f64 = torch.float64
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=f64, device=device)
    return torch.stack(
        [
            torch.tensor(v, dtype=f64, device=device) if isinstance(v, float) else v.to(device, f64)
            for v in values
        ]
    )


class _Scratch:
    """One numpy buffer per dtype, kept and reused for every tensor (so it stays in cache)."""

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[Any, Any] = {}

    def _buffer(self, a: Any) -> Any:
        """A scratch array of ``a``'s dtype and size (the start of a kept, grown buffer)."""
        buf = self._buffers.get(a.dtype)
        if buf is None or buf.size < a.size:
            buf = self._buffers[a.dtype] = np.empty(a.size, dtype=a.dtype)
        return buf[: a.size]


class DistScratch(_Scratch):
    """Squared distances of CPU tensors by numpy subtractions into a kept buffer and BLAS dots.

    ``torch.dist`` allocates ``x - y`` (``aten::sub``: a parameter-sized temporary, which the
    allocator may hand back to the OS and fault in again every step) and reduces it with a
    slower kernel than BLAS's dot; this writes the difference into one buffer per dtype, reused
    for every tensor (so it stays in cache), and sums its squares with ``dot``, accumulated in
    the tensors' precision (float32 for float32). :meth:`moved` returns None where BLAS cannot
    take the tensors (see :func:`blas_stats`; also for tensors of different dtypes or sizes).
    """

    __slots__ = ()

    def moved(
        self,
        p: torch.Tensor,
        snap: torch.Tensor | None,
        origin: torch.Tensor | None,
        measure: bool,
        copy: bool,
    ) -> tuple[float | None, float | None] | None:
        """``(||p - snap||^2 if measure, ||p - origin||^2 if origin is given)``, then ``snap``
        overwritten with ``p`` if ``copy``: one loop over ``p`` while it is in cache (measured
        and copied: the difference is formed in ``snap`` itself). None where BLAS cannot take
        the tensors (nothing done then)."""
        found = _blas_view(p)
        if found is None:
            return None
        fns, a = found
        n = a.size
        b = c = None
        if snap is not None and (measure or copy):
            b = _flat_numpy(snap) if snap.dtype == p.dtype else None
            if b is None or b.size != n:
                return None
        if origin is not None:
            c = _flat_numpy(origin) if origin.dtype == p.dtype else None
            if c is None or c.size != n:
                return None
        dot = fns[0]
        update = dist = None
        if c is not None:
            d = np.subtract(a, c, out=self._buffer(a))
            dist = float(dot(d, d))
        if b is not None:
            if measure:
                d = np.subtract(b, a, out=b) if copy else np.subtract(a, b, out=self._buffer(a))
                update = float(dot(d, d))
            if copy:
                np.copyto(b, a)
        return update, dist


class GsnrScratch(_Scratch):
    """One parameter's GSNR sum from its gradient and its per-sample second moment, in cache.

    With ``g`` this backward's gradient of a parameter, ``u`` the factor that makes it the batch
    mean ``m = u g`` (the loss scale and reduction undone), ``v_j = sum_i g_ij^2`` over the ``B``
    samples and ``eps`` the GSNR's epsilon, :meth:`term` returns ``(t, ||g||^2)`` with::

        t = sum_j m_j^2 / ((1/B) v_j - m_j^2 + eps) / B
          = u^2 sum_j g_j (g_j / (v_j - B u^2 g_j^2 + B eps))

    meant for a leaf hook, while ``g`` is in cache. With ``overwrite``, four passes over ``v``,
    which ends up holding ``g_j / (...)``: ``addcmul_`` (the one fused multiply-add), then
    numpy's add and divide and a BLAS dot (inside autograd's hooks a torch op costs ~10 us of
    dispatch, a numpy call ~2 us); else six passes over one scratch buffer per dtype, kept for
    every parameter (so it stays in cache); ``||g||^2`` by one more BLAS dot on the same view.
    Accumulated in the tensors' precision (float32 for float32). None where BLAS cannot take
    the pair (see :func:`blas_stats`; also tensors of
    different dtypes or sizes).
    """

    __slots__ = ()

    def term(
        self, g: torch.Tensor, v: torch.Tensor, b: int, u: float, eps: float, overwrite: bool
    ) -> tuple[float, float] | None:
        found = _blas_view(g)
        if found is None or v.dtype != g.dtype or v.requires_grad:
            return None
        (dot, _, _), a = found
        w = _flat_numpy(v)
        if w is None or a.size != w.size:
            return None
        sq = float(dot(a, a))
        if overwrite:
            v.addcmul_(g, g, value=-b * u * u)
            s = w
        else:
            s = np.multiply(a, a, out=self._buffer(a))
            s *= -b * u * u
            s += w
        s += b * eps  # v_j - B m_j^2 + B eps
        np.divide(a, s, out=s)
        return float(dot(a, s)) * (u * u), sq


def _blas_view(t: torch.Tensor) -> tuple[tuple[Callable[..., Any], ...], Any] | None:
    """(the BLAS level-1 functions for ``t``'s dtype, ``t`` as a flat numpy view), or None where
    BLAS cannot take ``t`` (see :func:`blas_stats`)."""
    fns = _BLAS.get(t.dtype)
    if fns is None:
        return None
    a = _flat_numpy(t)
    return None if a is None else (fns, a)


def _flat_numpy(g: torch.Tensor) -> Any:
    """``g`` as a flat numpy array sharing its memory, or None where BLAS cannot take it (see
    :func:`blas_stats`). The hot path of every gradient hook: ``numpy()`` then a numpy
    ``reshape`` (a torch ``view(-1)`` first would cost twice the rest)."""
    if not g.is_contiguous():
        return None
    try:  # numpy() refuses what BLAS cannot take: CUDA, a conjugate or negative bit
        a = (g.detach() if g.requires_grad else g).numpy().reshape(-1)
    except (RuntimeError, TypeError):
        return None
    if not 0 < a.size <= _BLAS_MAX:
        return None
    return a


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


class _Group:
    """The rows of one (numel, dtype) group between two flushes."""

    __slots__ = ("idx", "k", "rows", "small")

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        self.rows = torch.empty(4, n, dtype=dtype)  # |g| rows; capacity grows by doubling
        self.k = 0  # rows used
        self.idx: list[int] = []  # record index of each row
        self.small: list[torch.Tensor] = []  # gradients under _SMALL entries, by reference


class CpuArena:
    """Statistics of CPU gradients, collected as ``|g|`` rows and reduced row-wise in groups.

    On CPU the L1/Linf foreach kernels are not vectorised (measured 6x / 17x slower than L2), and
    every op costs a few microseconds of dispatch, so the three numbers come from few vectorised
    ops over many gradients at once:

    * :meth:`add` (called from the gradient hook, while the gradient is still in cache) writes
      ``|g|`` into the next row of a buffer kept for gradients of that size and dtype: one op, and
      no reference to the engine's tensor (which it can then free and reuse). A gradient of fewer
      than 4096 entries (a bias, a small layer) is only referenced: its op would cost more than
      its data, so the rows of small gradients are copied in one ``stack`` at the flush.
    * :meth:`flush` reduces every group's rows at once: ``vector_norm`` (sum of squares), ``sum``
      and ``amax`` along the rows, three ops per group whatever the number of gradients.

    The row buffers are kept between flushes, so a training loop writes into the same warm
    memory every step; they grow to the largest number of rows a group needed between two
    flushes. :meth:`one` reduces a single gradient on its own (the monitor's choice for one larger
    than 64 KiB, or than its ``buffer_bytes``).
    """

    __slots__ = ("_groups", "_scratch", "bytes")

    def __init__(self) -> None:
        self._groups: dict[tuple[int, torch.dtype], _Group] = {}
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        self.bytes = 0  # bytes held in rows since the last flush

    def add(self, g: torch.Tensor, index: int) -> None:
        """Store ``|g|`` (a non-empty CPU gradient) for the next :meth:`flush`, as ``index``."""
        if g.is_complex():
            g = g.abs()
        n = g.numel()
        key = (n, g.dtype)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(n, g.dtype)
        if n < _SMALL:
            # An op costs more than the copy: keep a reference, copy rows in one op at flush.
            group.small.append(g.reshape(-1))
        else:
            k = group.k
            if k == group.rows.shape[0]:  # full: double the capacity, keeping the rows written
                grown = torch.empty(2 * k, n, dtype=g.dtype)
                grown[:k] = group.rows
                group.rows = grown
            torch.abs(g.reshape(-1), out=group.rows[k])
        group.k += 1
        group.idx.append(index)
        self.bytes += n * g.element_size()

    def flush(self) -> tuple[list[torch.Tensor], list[int]]:
        """(3, k) chunks of (sum of squares, L1, max |g|) columns, and their record indices."""
        chunks: list[torch.Tensor] = []
        order: list[int] = []
        for group in self._groups.values():
            k = group.k
            if not k:
                continue
            if group.small:  # rows of small gradients: one copy, one abs for all of them
                if k > group.rows.shape[0]:
                    group.rows = torch.empty(k, group.rows.shape[1], dtype=group.rows.dtype)
                torch.stack(group.small, out=group.rows[:k]).abs_()
            m = group.rows[:k]
            acc = torch.float32 if m.dtype in _LOW_PRECISION else None
            sq = torch.linalg.vector_norm(m, dim=1, dtype=acc).square_()
            l1 = m.sum(dim=1, dtype=acc)
            hi = m.amax(dim=1)
            chunks.append(torch.stack([sq, l1, hi if acc is None else hi.to(acc)]))
            order.extend(group.idx)
            group.k = 0
            group.idx = []
            group.small = []
        self.bytes = 0
        return chunks, order

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._scratch[dtype] = torch.empty(max(n, 2**16), dtype=dtype)
        return buf[:n]

    def one(self, g: torch.Tensor) -> list[torch.Tensor]:
        """[sum of squares, L1, max |g|] of one non-empty CPU gradient, as 0-dim tensors."""
        if g.is_complex():
            g = g.abs()
        flat = g.reshape(-1)
        n = flat.numel()
        a = torch.abs(flat, out=self._buffer(g.dtype, n)) if n <= _SCRATCH_MAX else flat.abs()
        if g.dtype in _LOW_PRECISION:
            sq = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
            return [sq, a.sum(dtype=torch.float32), a.amax().float()]
        return [torch.dot(flat, flat), a.sum(), a.amax()]
