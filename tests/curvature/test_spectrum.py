"""gradlab.curvature._spectrum: hessian_spectrum (SLQ) against the dense spectrum."""

from __future__ import annotations

import torch

import gradlab as gl
from tests.curvature._helpers import _setup


def test_spectrum_density_integrates_to_one_and_mean_is_trace_over_n(device):
    model, loss_fn, H = _setup(device)
    n = H.shape[0]
    spec = gl.hessian_spectrum(loss_fn, model, probes=300, steps=8, generator=3)
    assert isinstance(spec, gl.Spectrum) and spec.grid.shape == spec.density.shape
    torch.testing.assert_close(
        torch.trapezoid(spec.density, spec.grid), torch.tensor(1.0, dtype=torch.float64)
    )
    assert bool((spec.density >= 0).all())
    torch.testing.assert_close(spec.weights.sum(1), torch.ones(300, dtype=torch.float64))
    mean = torch.trapezoid(spec.grid * spec.density, spec.grid)
    quadrature_mean = (spec.nodes * spec.weights).sum(1).mean()
    torch.testing.assert_close(mean, quadrature_mean, rtol=1e-6, atol=1e-8)
    trace = H.diagonal().sum()
    assert abs(mean - trace / n) <= 0.1 * abs(trace / n)
    # with full Lanczos the nodes of every probe lie in the true spectral range
    evals = torch.linalg.eigvalsh(H)
    full = gl.hessian_spectrum(loss_fn, model, probes=2, steps=n, generator=4)
    assert full.nodes.min() >= evals.min() - 1e-8 and full.nodes.max() <= evals.max() + 1e-8


def test_result_reprs_show_numbers_and_shapes_not_whole_tensors():
    w = torch.randn(300, dtype=torch.float64, requires_grad=True)
    loss = lambda: (w**2 * torch.linspace(0.1, 1, 300, dtype=torch.float64)).sum()
    spec = gl.hessian_spectrum(loss, w, probes=2, steps=10, generator=0)
    text = repr(spec)
    assert text.startswith("Spectrum(grid: ") and "2 probes x 10 steps" in text
    assert "tensor(" not in text and len(text) < 120
    pairs = gl.hessian_eigenvalues(loss, w, k=2, generator=0)
    text = repr(pairs)
    assert text.startswith("Eigenpairs(values=[2, 1.99") and "vectors: (2, 300)" in text
    assert "tensor(" not in text
