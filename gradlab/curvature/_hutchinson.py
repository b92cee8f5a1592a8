r"""Hutchinson's trace estimator and the Hutchinson-Bekas diagonal estimator.

Rademacher probes :math:`z` drawn chunk by chunk from one seed (never all stored; see
:mod:`gradlab.curvature._probes` for the draw); every batch of the operator gets all of them in
one pass. Cost: ``samples`` products.
"""

from __future__ import annotations

import torch

from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._probes import rademacher_chunks

__all__ = ["hutchinson_diagonal", "hutchinson_trace"]


def hutchinson_trace(
    op: CurvatureOperator, samples: int, seed: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`\frac1m \sum_i z_i^\top A z_i` with ``samples`` Rademacher probes.

    ``rows``: an optional 0/1 mask (length n) restricting the probes to a block. The probes are
    drawn chunk by chunk (never all stored) and every batch graph gets all of them in one pass.
    """
    acc = torch.zeros((), dtype=op.dtype, device=op.device)
    chunks, draw = rademacher_chunks(op, samples, seed)
    masks = (
        None if rows is None else [m.reshape(s) for m, s in zip(rows.split(op.sizes), op.shapes)]
    )

    def vectors(c: int) -> Pieces:
        V = draw(c)
        return V if masks is None else [v.mul_(m) for v, m in zip(V, masks)]

    def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
        total = sum(torch.dot(v.reshape(-1), h.reshape(-1)) for v, h in zip(V, HV))
        acc.add_(total, alpha=w)  # type: ignore[arg-type]

    op._sweep(chunks, vectors, accumulate, [acc])
    return acc / samples


def hutchinson_diagonal(op: CurvatureOperator, samples: int, seed: int) -> torch.Tensor:
    """:math:`\\frac1m \\sum_i z_i \\odot A z_i`, flat, with ``samples`` Rademacher probes."""
    out = torch.zeros(op.n, dtype=op.dtype, device=op.device)
    chunks, vectors = rademacher_chunks(op, samples, seed)

    def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
        for i, (v, h) in enumerate(zip(V, HV)):
            out[op.offsets[i] : op.offsets[i + 1]].add_((v * h).sum(0).reshape(-1), alpha=w)

    op._sweep(chunks, vectors, accumulate, [out])
    return out.div_(samples)
