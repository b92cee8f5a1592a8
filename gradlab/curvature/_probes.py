r"""Rademacher probes: independent uniform signs :math:`\pm 1`, cheaply and reproducibly drawn.

A sign needs one random bit, but ``torch.randint(0, 2, ...)`` spends one generator call (32 bits)
on each, and ``2 * z - 1`` two more passes over the result. Large draws here take 56 bits per
generator call instead: ``randint(0, 2**56)`` in ``int64`` is exactly uniform on 7 bytes (the
generator's 64-bit word modulo a power of two), and each byte becomes its 8 signs by one lookup
in a 256 x 8 table of signs (``index_select``), written straight in the probes' dtype. Small
draws, where a kernel's fixed cost dominates, take ``randint`` and one ``mul_``/``sub_``.

The same generator state gives the same signs (the bytes are taken from each word by shifts, not
by its memory layout, so the byte order does not matter; the stream differs from one ``randint``
per sign). The probes of every parameter come from one draw
per chunk of vectors, split into per-parameter views.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

# (no import of _base, not even for types: _base draws its probes from here)
Pieces = list[torch.Tensor]

__all__ = ["pieces", "rademacher", "rademacher_chunks", "rademacher_rows"]

_LOOKUP = 1 << 13  # from this many entries on, signs come from random bytes and the table
_BYTES = 7  # random bytes per int64 draw from [0, 2**56)


@functools.cache
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row ``b`` holds ``2 * bit_k(b) - 1`` for k = 0..7 (never written to)."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (bits * 2 - 1).to(dtype)


@functools.cache
def _byte_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8 * _BYTES, 8, device=device)


def rademacher(
    shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Independent uniform signs +-1 of ``shape`` (contiguous), drawn from ``gen``.

    Example:
        >>> import torch
        >>> from gradlab.curvature._probes import rademacher
        >>> g = torch.Generator().manual_seed(0)
        >>> z = rademacher((3, 10_000), g, torch.float64, torch.device("cpu"))
        >>> z.shape, sorted(z.unique().tolist())
        (torch.Size([3, 10000]), [-1.0, 1.0])
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if numel < _LOOKUP:
        t = torch.randint(0, 2, shape, generator=gen, dtype=dtype, device=device)
        return t.mul_(2).sub_(1)
    nbytes = (numel + 7) // 8
    words = (nbytes + _BYTES - 1) // _BYTES
    raw = torch.randint(0, 1 << 56, (words,), generator=gen, dtype=torch.int64, device=device)
    device = torch.device(device)
    data = ((raw.unsqueeze(1) >> _byte_shifts(device)) & 255).reshape(-1)[:nbytes]
    signs = torch.index_select(_sign_table(dtype, device), 0, data)
    return signs.reshape(-1)[:numel].view(shape)


def rademacher_rows(op: Any, m: int, seed: int) -> tuple[int, Callable[[int], torch.Tensor]]:
    """``m`` Rademacher vectors as ``(chunks, rows)``: ``rows(c)`` is chunk ``c``'s one draw.

    Chunk ``c`` holds ``min(k, m - c k)`` vectors (``k`` = the operator's chunk), drawn as one
    contiguous ``(rows, n)`` tensor. The same seed gives the same vectors on every call and every
    rank: the generator is reseeded at chunk 0, and chunks are asked for in order.
    """
    k = op._chunk
    gen = torch.Generator(device=op.device)

    def rows(c: int) -> torch.Tensor:
        if c == 0:
            gen.manual_seed(seed)
        return rademacher((min(k, m - c * k), op.n), gen, op.dtype, op.device)

    return math.ceil(m / k), rows


def pieces(op: Any, flat: torch.Tensor) -> Pieces:
    """Rows ``(k, n)`` as per-parameter views ``(k, *shape)`` (no copy)."""
    k = flat.shape[0]
    return [piece.view(k, *shape) for piece, shape in zip(flat.split(op.sizes, 1), op.shapes)]


def rademacher_chunks(op: Any, m: int, seed: int) -> tuple[int, Callable[[int], Pieces]]:
    """``m`` Rademacher vectors as ``(chunks, vectors)`` for the operator's ``_sweep``.

    Each chunk is one draw of ``(rows, n)`` signs (:func:`rademacher_rows`) split into
    per-parameter pieces ``(rows, *shape)`` (views).
    """
    chunks, rows = rademacher_rows(op, m, seed)
    return chunks, lambda c: pieces(op, rows(c))
