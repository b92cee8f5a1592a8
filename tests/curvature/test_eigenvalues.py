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


def test_lanczos_stops_only_when_within_tol_of_an_eigenvalue(device):
    # a slowly decaying spectrum: with few steps the gap to the next Ritz value is far larger than
    # the true gap, and the old estimate r^2/gap stopped early on 10 of these 30 start vectors
    # (up to 5.6% off); the residual rule r <= tol |theta| is a bound whatever the spectrum
    d = 4.0 * 0.97 ** torch.arange(2000, dtype=torch.float64, device=device)
    w = torch.ones(2000, dtype=torch.float64, device=device, requires_grad=True)
    for seed in range(30):
        res = gl.hessian_eigenvalues(
            lambda: 0.5 * (d * w * w).sum(), w, k=1, tol=1e-2, generator=seed
        )
        theta, vec = float(res.values[0]), res.vectors[0]
        assert abs(theta - 4.0) <= 1e-2 * 4.0, seed
        # the stopping rule is on the residual of the returned pair itself
        assert float(vec.norm()) == pytest.approx(1.0, abs=1e-12)
        assert float((d * vec - theta * vec).norm()) <= 1.0001e-2 * theta, seed
