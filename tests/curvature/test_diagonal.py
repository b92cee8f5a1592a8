"""gradlab.curvature._diagonal: hessian_diagonal against the dense Hessian."""

from __future__ import annotations

import pytest
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


def test_exact_uses_hessian_backprop_when_supported_and_combines_batches(monkeypatch):
    """Where _backprop.exact_diagonal answers, its per-batch diagonals are averaged by weight."""
    from gradlab._derivatives._hvp_engine import GradGraph
    from gradlab.curvature import _backprop
    from tests.curvature._helpers import dataset_problem

    model, x, y, loss_fn, H, _ = dataset_problem()
    params = list(model.parameters())
    calls = []

    def fake_exact_diagonal(closure, ps):
        # an independent exact diagonal: rows of the dense Hessian of this batch's loss
        loss = closure()
        calls.append(float(loss.detach()))
        rows = []
        for p in ps:
            (g,) = torch.autograd.grad(loss, p, create_graph=True, allow_unused=True)
            if g is None:
                rows.append(torch.zeros_like(p))
                continue
            d = torch.stack(
                [
                    torch.autograd.grad(g.flatten()[j], p, retain_graph=True)[0].flatten()[j]
                    for j in range(p.numel())
                ]
            )
            rows.append(d.reshape(p.shape))
        return rows

    def no_hvp(*args, **kwargs):
        raise AssertionError("the HVP fallback ran although Hessian backprop answered")

    monkeypatch.setattr(_backprop, "exact_diagonal", fake_exact_diagonal)
    monkeypatch.setattr(GradGraph, "hvp", no_hvp)
    data = [(x[:5], y[:5]), (x[5:12], y[5:12]), (x[12:], y[12:])]
    diag = gl.hessian_diagonal(loss_fn, params, method="exact", data=data)
    torch.testing.assert_close(
        torch.cat([d.flatten() for d in diag]), H.diagonal(), rtol=1e-10, atol=1e-12
    )
    assert len(calls) == 3
    tr = gl.hessian_trace(lambda: loss_fn((x, y)), params, method="exact")
    torch.testing.assert_close(tr, H.trace(), rtol=1e-10, atol=1e-12)
    # unused parameters are found from the loss graph, without products
    spare = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(gl.GraphError, match=r"hessian_diagonal: the loss does not use params\[4\]"):
        gl.hessian_diagonal(loss_fn, [*params, spare], method="exact", data=data)


def test_exact_diagonal_falls_back_to_products_when_backprop_declines(monkeypatch):
    from gradlab.curvature import _backprop
    from tests.curvature._helpers import dataset_problem

    model, x, y, loss_fn, H, _ = dataset_problem()
    # this model is on the fast path; make Hessian backprop decline it (as it does a residual
    # network, tests/curvature/test_backprop.py) to exercise the product fallback
    assert _backprop.exact_diagonal(lambda: loss_fn((x, y)), list(model.parameters())) is not None
    monkeypatch.setattr(_backprop, "exact_diagonal", lambda *a: None)
    seen = []
    diag = gl.hessian_diagonal(
        lambda: loss_fn((x, y)), model, method="exact", progress=lambda d, t: seen.append(d)
    )
    torch.testing.assert_close(
        torch.cat([d.flatten() for d in diag.values()]), H.diagonal(), rtol=1e-12, atol=1e-12
    )
    assert seen[-1] == H.shape[0]  # n products
