"""gradlab.curvature._losses: the registered loss rules against torch.func references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.curvature._losses import BCE_WITH_LOGITS, CROSS_ENTROPY, MSE


def _per_term_hessians(loss, f, y):
    """Each term's Hessian w.r.t. its own output entries, (terms, C, C), by torch.func: the
    outputs ``(N, C, *spatial)`` as terms ``(N * prod(spatial), C)``, each term's loss summed."""
    C = f.shape[1]
    rows = f.movedim(1, -1).reshape(-1, C)
    targets = y.reshape(-1) if loss is CROSS_ENTROPY else y.movedim(1, -1).reshape(-1, C)

    def term(row, target):
        if loss is CROSS_ENTROPY:
            row, target = row.unsqueeze(0), target.unsqueeze(0)
            return nn.functional.cross_entropy(row, target, reduction="sum")
        if loss is MSE:
            return nn.functional.mse_loss(row, target, reduction="sum")
        return nn.functional.binary_cross_entropy_with_logits(row, target, reduction="sum")

    return torch.stack([torch.func.hessian(term)(r, t) for r, t in zip(rows, targets)])


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        (CROSS_ENTROPY, (5, 4)),
        (CROSS_ENTROPY, (3, 10)),
        (CROSS_ENTROPY, (3, 2)),
        (CROSS_ENTROPY, (4, 1)),
        (CROSS_ENTROPY, (2, 3, 2, 3)),  # a class map: one term per sample and pixel
        (MSE, (4, 3)),
        (BCE_WITH_LOGITS, (4, 3)),
    ],
    ids=["ce-4", "ce-10", "ce-2", "ce-1", "ce-spatial", "mse", "bce"],
)
def test_sqrt_factors_each_terms_hessian(loss, shape, device):
    """sum_j s_j s_j^T is the loss Hessian of every term (float64, to rounding)."""
    g = torch.Generator().manual_seed(0)
    f = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device)
    if loss is CROSS_ENTROPY:
        y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g).to(device)
    else:
        y = torch.rand(shape, generator=g, dtype=torch.float64).to(device)
    S = loss.sqrt(f, y)
    assert S.shape[1:] == f.shape
    if loss is CROSS_ENTROPY:  # as many columns as the Hessian's rank (1 is in its null space)
        assert S.shape[0] == max(1, shape[1] - 1)
    rows = S.movedim(2, -1).reshape(S.shape[0], -1, shape[1])  # (m, terms, C)
    H = torch.einsum("mti,mtj->tij", rows, rows)
    expected = _per_term_hessians(loss, f, y)
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-14)
