r"""Hutchinson's trace estimator and the Hutchinson-Bekas diagonal estimator.

Rademacher probes :math:`z` drawn chunk by chunk from one seed (never all stored; see
:mod:`gradlab.curvature._probes` for the draw); every batch of the operator gets all of them in
one pass. Cost: ``samples`` products.
"""

from __future__ import annotations

import torch

from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._probes import pieces, rademacher_chunks, rademacher_rows

__all__ = ["hutchinson_diagonal", "hutchinson_trace"]


def hutchinson_trace(
    op: CurvatureOperator, samples: int, seed: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`\frac1m \sum_i z_i^\top A z_i` with ``samples`` Rademacher probes.

    ``rows``: an optional 0/1 mask (length n) restricting the probes to a block. The probes are
    drawn chunk by chunk (never all stored) and every batch graph gets all of them in one pass.
    Per chunk the forms cost one ``dot`` of the drawn ``(k, n)`` signs with the products (laid
    side by side), added into a device scalar: no per-parameter sums, no host sync.
    """
    acc = torch.zeros((), dtype=op.dtype, device=op.device)
    chunks, draw = rademacher_rows(op, samples, seed)
    drawn: list[torch.Tensor] = []  # the flat signs of the chunk being applied

    def vectors(c: int) -> Pieces:
        Z = draw(c)
        if rows is not None:
            Z.mul_(rows)
        drawn[:] = [Z]
        return pieces(op, Z)

    def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
        k = V[0].shape[0]
        AZ = HV[0] if len(HV) == 1 else torch.cat([h.reshape(k, -1) for h in HV], 1)
        acc.add_(torch.dot(drawn[0].reshape(-1), AZ.reshape(-1)), alpha=w)

    op._sweep(chunks, vectors, accumulate, [acc], final=True)
    return acc / samples


def hutchinson_diagonal(op: CurvatureOperator, samples: int, seed: int) -> torch.Tensor:
    """:math:`\\frac1m \\sum_i z_i \\odot A z_i`, flat, with ``samples`` Rademacher probes."""
    out = torch.zeros(op.n, dtype=op.dtype, device=op.device)
    chunks, vectors = rademacher_chunks(op, samples, seed)

    def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
        for i, (v, h) in enumerate(zip(V, HV)):
            out[op.offsets[i] : op.offsets[i + 1]].add_((v * h).sum(0).reshape(-1), alpha=w)

    op._sweep(chunks, vectors, accumulate, [out], final=True)
    return out.div_(samples)
