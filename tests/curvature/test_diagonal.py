"""gradlab.curvature._diagonal: hessian_diagonal against the dense Hessian."""

from __future__ import annotations

import torch

import gradlab as gl
from tests.curvature._helpers import _setup


def test_hutchinson_diagonal_converges(device):
    model, loss_fn, H = _setup(device)
    est = gl.hessian_diagonal(loss_fn, model, samples=2000, generator=2)
    flat = torch.cat([d.flatten() for d in est.values()])
    err = (flat - H.diagonal()).norm() / H.diagonal().norm()
    assert err < 0.15


def test_under_no_grad_and_linear_part_gives_zero():
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    with torch.no_grad():
        diag = gl.hessian_diagonal(lambda: (w**3).sum() + v.sum(), [w, v], method="exact")
    torch.testing.assert_close(diag[0], 6 * w.detach())
    torch.testing.assert_close(diag[1], torch.zeros(2))
