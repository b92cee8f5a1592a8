"""float64 gradcheck of every penalty with respect to the critic's (generator's) parameters.

torch.autograd.gradcheck compares the analytical gradient (a double backward through the
critic) with central finite differences. Every registered penalty and method is checked (the
registry loop is in ``_shared.check_gradcheck``); the options that change the formula
(WGAN-LP, the zero-centred GP), a conv critic and path length are checked here by name. Random
draws are re-seeded inside each function, so the function of the parameters is deterministic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gradlab.penalties import PENALTIES, path_length_penalty
from tests.penalties._shared import call, cases, check_gradcheck


@pytest.mark.parametrize(("entry", "method"), cases())
def test_gradcheck_mlp_critic(entry, method):
    check_gradcheck(entry, method)


def _check(module: nn.Module, loss_of_module) -> None:
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def f(*ps):
        return loss_of_module(lambda *a, **k: functional_call(module, dict(zip(names, ps)), a, k))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"one_sided": True, "center": 0.3}, {"center": 0.0}],
    ids=["wgan-lp", "zero-centred-gp"],
)
def test_gradcheck_gradient_penalty_variants(options):
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    real = torch.randn(3, 3, dtype=torch.float64)
    fake = torch.randn(3, 3, dtype=torch.float64)
    _check(critic, lambda c: call(PENALTIES["wgan-gp"], c, real, fake, **options))


@pytest.mark.parametrize("name", ["wgan-gp", "r1"])
def test_gradcheck_conv_critic(name):
    torch.manual_seed(0)
    critic = nn.Sequential(
        nn.Conv2d(2, 2, 3, stride=2), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 2 * 2, 1)
    ).double()
    real = torch.randn(2, 2, 5, 5, dtype=torch.float64)  # 4-D images
    fake = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    _check(critic, lambda c: call(PENALTIES[name], c, real, fake))


def test_gradcheck_path_length():
    torch.manual_seed(0)
    synthesis = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Unflatten(1, (3, 2, 2))).double()
    w = torch.randn(3, 3, dtype=torch.float64)

    def loss(g):
        wl = w.clone().requires_grad_(True)
        return path_length_penalty(g(wl), wl, mean=0.2, decay=0.1, generator=0).penalty

    _check(synthesis, loss)
