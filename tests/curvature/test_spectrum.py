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
