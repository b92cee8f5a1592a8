"""dragan_penalty against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.penalties import dragan_penalty, dragan_penalty_and_norms
from tests.penalties._reference import CASES, hand_gp, make_case


def _hand_dragan_points(real, seed, noise_scale):
    """Noise first (one U[0,1) per element), then one coefficient per sample, as documented."""
    g = torch.Generator().manual_seed(seed)
    perturbed = []
    for x in real:
        u = torch.rand(x.shape, generator=g, dtype=x.dtype).to(x.device)
        perturbed.append(x + noise_scale * x.std() * u)
    a = torch.rand(real[0].shape[0], generator=g, dtype=real[0].dtype).to(real[0].device)
    return tuple(x + a.view(-1, *[1] * (x.ndim - 1)) * (p - x) for x, p in zip(real, perturbed))


@pytest.mark.parametrize("case", CASES)
def test_matches_hand_formula(case, device):
    critic, real, _, kwargs = make_case(case, dtype=torch.float64, device=device)
    arg = real[0] if len(real) == 1 else real
    out = dragan_penalty_and_norms(
        critic,
        arg,
        weight=2.0,
        noise_scale=0.7,
        critic_kwargs=kwargs,
        generator=torch.Generator().manual_seed(4),
    )
    x_hat = _hand_dragan_points(real, 4, 0.7)
    want = hand_gp(critic, x_hat, kwargs, weight=2.0)
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=0)
    params = list(critic.parameters())
    got = torch.autograd.grad(out.penalty, params, allow_unused=True, materialize_grads=True)
    ref = torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_noise_scale_zero_evaluates_at_the_real_points():
    critic, real, _, _ = make_case("mlp", dtype=torch.float64)
    got = dragan_penalty(critic, real[0], noise_scale=0.0, center=0.5)
    torch.testing.assert_close(got, hand_gp(critic, real, center=0.5), rtol=1e-12, atol=0)


def test_linear_critic_and_errors():
    critic = nn.Linear(3, 1)
    w = critic.weight.detach()
    x = torch.randn(5, 3)
    torch.testing.assert_close(dragan_penalty(critic, x), 10 * (w.norm() - 1) ** 2)
    assert x.grad is None and critic.weight.grad is None
    with pytest.raises(
        ValueError, match=r"dragan_penalty: noise_scale must be a finite number >= 0"
    ):
        dragan_penalty(critic, x, noise_scale=-0.5)
    with pytest.raises(ValueError, match=r"dragan_penalty: weight must be a finite number >= 0"):
        dragan_penalty(critic, x, weight=float("nan"))
