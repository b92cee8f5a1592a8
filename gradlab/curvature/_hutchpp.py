r"""Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a sketch, exact on its range, then Hutchinson.

With ``samples`` products in all: a third sketch :math:`Q = \operatorname{orth}(A S)`, the exact
trace of :math:`Q^\top A Q`, and Hutchinson on the deflated rest (far lower variance than
Hutchinson when a few eigenvalues dominate).
"""

from __future__ import annotations

import torch

from gradlab.curvature._base import CurvatureOperator

__all__ = ["hutch_plus_plus"]


def hutch_plus_plus(op: CurvatureOperator, samples: int, seed: int) -> torch.Tensor:
    r"""Hutch++ with ``samples`` products: a sketch, exact on its range, Hutchinson on the rest."""
    k = samples // 3
    rest = samples - 2 * k
    S = op._random_rows(k, seed)
    Q, _ = torch.linalg.qr(op._rows_products(S).T)  # (n, k)
    G = op._random_rows(rest, seed + 1)
    G = G - (G @ Q) @ Q.T
    forms = op._rows_forms(torch.cat([Q.T, G]), final=True)
    return forms[:k].sum() + forms[k:].sum() / rest
