"""float64 gradcheck of every penalty with respect to the critic's (generator's) parameters.

torch.autograd.gradcheck compares the analytical gradient (a double backward through the
critic) with central finite differences. Random draws are re-seeded inside each function, so
the function of the parameters is deterministic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gradlab.penalties import (
    dragan_penalty,
    gradient_penalty,
    path_length_penalty,
    r1_penalty,
    r2_penalty,
)
from tests.penalties._reference import MLPCritic


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


PENALTIES = {
    "wgan-gp": lambda c, r, f: gradient_penalty(c, r, f, generator=_gen()),
    "wgan-lp": lambda c, r, f: gradient_penalty(
        c, r, f, one_sided=True, center=0.3, generator=_gen()
    ),
    "zero-centred-gp": lambda c, r, f: gradient_penalty(c, r, f, center=0.0, generator=_gen()),
    "r1": lambda c, r, f: r1_penalty(c, r, gamma=3.0),
    "r2": lambda c, r, f: r2_penalty(c, f, gamma=3.0),
    "dragan": lambda c, r, f: dragan_penalty(c, r, generator=_gen()),
    "r1-finite-difference": lambda c, r, f: r1_penalty(
        c, r, gamma=3.0, method="finite-difference", sigma=0.1, generator=_gen()
    ),
}


def _check(module: nn.Module, loss_of_module) -> None:
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def f(*ps):
        return loss_of_module(lambda *a, **k: functional_call(module, dict(zip(names, ps)), a, k))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_gradcheck_mlp_critic(name):
    torch.manual_seed(0)
    critic = MLPCritic(d=3, h=4).double()
    real = torch.randn(3, 3, dtype=torch.float64)
    fake = torch.randn(3, 3, dtype=torch.float64)
    _check(critic, lambda c: PENALTIES[name](c, real, fake))


@pytest.mark.parametrize("name", ["wgan-gp", "r1"])
def test_gradcheck_conv_critic(name):
    torch.manual_seed(0)
    critic = nn.Sequential(
        nn.Conv2d(2, 2, 3, stride=2), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 2 * 2, 1)
    ).double()
    real = torch.randn(2, 2, 5, 5, dtype=torch.float64)  # 4-D images
    fake = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    _check(critic, lambda c: PENALTIES[name](c, real, fake))


def test_gradcheck_path_length():
    torch.manual_seed(0)
    synthesis = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Unflatten(1, (3, 2, 2))).double()
    w = torch.randn(3, 3, dtype=torch.float64)

    def loss(g):
        wl = w.clone().requires_grad_(True)
        return path_length_penalty(g(wl), wl, mean=0.2, decay=0.1, generator=_gen()).penalty

    _check(synthesis, loss)
