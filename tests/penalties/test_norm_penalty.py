"""norm_penalty (the reduction every norm penalty ends in) against the formula written out."""

from __future__ import annotations

import sys

import pytest
import torch

import gradlab.penalties  # noqa: F401  (loads the submodule the package's name shadows)

norm_penalty = sys.modules["gradlab.penalties.gradient_penalty"].norm_penalty


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("center", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("one_sided", [False, True])
def test_matches_weight_times_mean_of_squared_deviations(dtype, center, one_sided, device):
    torch.manual_seed(0)
    norms = (torch.rand(7, dtype=torch.float64, device=device) * 2).requires_grad_(True)
    x = norms.to(dtype)
    got = norm_penalty(x, weight=3.0, center=center, one_sided=one_sided)
    dev = x.double() - center
    if one_sided:
        dev = dev.clamp(min=0)
    want = 3.0 * (dev**2).mean()
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 0}
    if dtype == torch.float32:
        tol = {"rtol": 1e-6, "atol": 1e-7}
    assert got.dtype == dtype and got.shape == ()
    torch.testing.assert_close(got.double(), want, **tol)
    (g_got,) = torch.autograd.grad(got, norms)
    (g_want,) = torch.autograd.grad(want, norms)
    torch.testing.assert_close(g_got, g_want, **tol)


def test_double_backward_matches_the_formula():
    norms = torch.rand(6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(
        lambda n: norm_penalty(n, weight=2.5, center=1.0, one_sided=False), (norms,)
    )
    torch.autograd.gradcheck(
        lambda n: norm_penalty(n, weight=2.5, center=0.5, one_sided=True), (norms,)
    )


def test_empty_batch_gives_nan_not_an_exception():
    """An empty batch keeps mean()'s behaviour (NaN) instead of dividing by zero in Python."""
    assert torch.isnan(norm_penalty(torch.zeros(0), weight=10.0, center=1.0, one_sided=False))
