"""Top eigenvalues by magnitude with power iteration and deflation (PyHessian's method)."""

from __future__ import annotations

import torch

from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._lanczos import _dot, _norm
from gradlab.curvature._results import Eigenpairs

__all__ = ["top_power"]


def _deflate(v: Pieces, found: list[Pieces]) -> None:
    """``v -= (u . v) u`` for each unit vector ``u`` in ``found``, in place."""
    for u in found:
        torch._foreach_add_(v, u, alpha=-_dot(u, v))


def top_power(op: CurvatureOperator, k: int, max_iter: int, tol: float, seed: int) -> Eigenpairs:
    """Power iteration with deflation, on per-parameter pieces like :func:`lanczos`."""
    values: list[float] = []
    found: list[Pieces] = []
    for i in range(k):
        v = [piece[0] for piece in op._split(op._random_rows(1, seed + i, "gaussian"))]
        lam = 0.0
        for _ in range(max_iter):
            _deflate(v, found)
            torch._foreach_div_(v, _norm(v))
            hv = op.apply(v)  # fresh tensors: updated in place
            _deflate(hv, found)
            new = _dot(v, hv)
            v = hv
            converged = abs(new - lam) <= tol * abs(new)
            lam = new
            if converged:
                break
        _deflate(v, found)
        torch._foreach_div_(v, _norm(v))
        values.append(lam)
        found.append(v)
    vals = torch.tensor(values, dtype=op.dtype, device=op.device)
    order = torch.argsort(vals.abs(), descending=True)
    vectors = torch.stack([torch.cat([piece.reshape(-1) for piece in u]) for u in found])
    return Eigenpairs(vals[order], vectors[order])
