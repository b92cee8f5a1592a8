"""gradlab.curvature._eigenvalues: hessian_eigenvalues against eigvalsh of the dense Hessian."""

from __future__ import annotations

import pytest
import torch

import gradlab as gl
from tests.curvature._helpers import _setup


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top3_eigenvalues_match_eigvalsh(method, device):
    model, loss_fn, H = _setup(device)
    evals = torch.linalg.eigvalsh(H)
    expected = evals[torch.argsort(evals.abs(), descending=True)[:3]]
    kw = {"max_iter": 2000, "tol": 1e-12} if method == "power" else {}
    res = gl.hessian_eigenvalues(loss_fn, model, k=3, method=method, generator=0, **kw)
    assert isinstance(res, gl.Eigenpairs) and res.values.shape == (3,)
    torch.testing.assert_close(res.values, expected, rtol=1e-4, atol=0)
    assert res.vectors.shape == (3, H.shape[0])
    for lam, vec in zip(res.values, res.vectors):
        torch.testing.assert_close(H @ vec, lam * vec, atol=1e-3 * lam.abs(), rtol=0)
    assert all(p.grad is None for p in model.parameters())
