"""The core: norm_penalty (the reduction every exact penalty ends in) against the formula
written out; the spec object; no module shadowed by its function."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from gradlab.penalties._core import PenaltySpec
from gradlab.penalties._core import norm_penalty as _norm_penalty


def norm_penalty(norms, *, weight, center, one_sided):
    return _norm_penalty(norms, PenaltySpec("test", weight, center, one_sided))


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


def test_squared_spec_is_weight_times_mean_of_squared_norms():
    sq = torch.rand(5, dtype=torch.float64)
    got = _norm_penalty(sq, PenaltySpec("r1_penalty", 1.5, squared=True))
    torch.testing.assert_close(got, 1.5 * sq.mean(), rtol=1e-15, atol=0)


def test_spec_is_frozen():
    spec = PenaltySpec("gradient_penalty", 10.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weight = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "name", ["wgan_gp", "r1", "r2", "dragan", "path_length", "lazy", "_core", "_norms"]
)
def test_modules_are_not_shadowed_by_their_functions(name):
    """`import gradlab.penalties.<module> as m` gives the module, and no module is named after
    the function it exports (gradient_penalty lives in wgan_gp)."""
    import gradlab.penalties as package

    module = importlib.import_module(f"gradlab.penalties.{name}")
    assert getattr(package, name, module) is module
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gradlab.penalties.gradient_penalty")
    assert callable(package.gradient_penalty) and package.gradient_penalty.__module__ == (
        "gradlab.penalties.wgan_gp"
    )
