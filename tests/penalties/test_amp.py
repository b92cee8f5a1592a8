"""Mixed precision: scaler= follows PyTorch's AMP gradient-penalty recipe.

CPU: bfloat16 autocast with a GradScaler (enabled on CPU in torch >= 2.3); CUDA (when present, via
the ``device`` fixture): float16 autocast with a GradScaler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.penalties import (
    dragan_penalty,
    gradient_penalty,
    input_gradient_norms,
    path_length_penalty,
    r1_penalty,
    r2_penalty,
)


class _SpyScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaled: list[torch.Tensor] = []

    def scale(self, outputs):  # type: ignore[override]
        self.scaled.append(outputs)
        return super().scale(outputs)


def _critic(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 1),
    ).to(device)


PENALTIES = {
    "gp": lambda c, r, f, **kw: gradient_penalty(
        c, r, f, generator=torch.Generator().manual_seed(0), **kw
    ),
    "r1": lambda c, r, f, **kw: r1_penalty(c, r, **kw),
    "r2": lambda c, r, f, **kw: r2_penalty(c, f, **kw),
    "dragan": lambda c, r, f, **kw: dragan_penalty(
        c, r, generator=torch.Generator().manual_seed(0), **kw
    ),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_power_of_two_scale_is_exact_in_float32(name):
    """grad(scale * D) / scale == grad(D) bit for bit (scaling by 2^k is exact): the scaler is
    applied to the outputs and undone out of place, and really used (the spy sees it)."""
    critic = _critic()
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    scaler = _SpyScaler("cpu", init_scale=2.0**12)
    with_scaler = PENALTIES[name](critic, real, fake, scaler=scaler)
    assert len(scaler.scaled) == 1 and scaler.scaled[0].shape == (4, 1)
    plain = PENALTIES[name](critic, real, fake)
    assert torch.equal(with_scaler, plain)
    params = list(critic.parameters())
    ga = torch.autograd.grad(with_scaler, params, allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad(plain, params, allow_unused=True, materialize_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_disabled_scaler_is_ignored_and_core_and_path_length_accept_one():
    scaler = _SpyScaler("cpu", enabled=False)
    critic = _critic()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    norms = input_gradient_norms(critic(x), x, scaler=scaler)
    assert scaler.scaled == [] and norms.shape == (2,)
    w = torch.randn(2, 4, requires_grad=True)
    images = torch.tanh(nn.Linear(4, 48)(w)).view(2, 3, 4, 4)
    on = _SpyScaler("cpu", init_scale=2.0**8)
    a = path_length_penalty(
        images, w, mean=0.0, scaler=on, generator=torch.Generator().manual_seed(1)
    )
    b = path_length_penalty(images, w, mean=0.0, generator=torch.Generator().manual_seed(1))
    assert len(on.scaled) == 1 and torch.equal(a.penalty, b.penalty)


def _rel_err(a, b):
    """||a - b|| / ||b||, and ||a|| where b is exactly 0 (biases of a piecewise-linear critic)."""
    diff = (a.float() - b.float()).norm().item()
    ref = b.float().norm().item()
    return diff / ref if ref > 0 else diff


@pytest.mark.parametrize("name", list(PENALTIES))
def test_autocast_with_grad_scaler_training_step(name, device):
    """The full recipe: penalty under autocast with scaler=, scaler.scale(loss).backward(),
    unscale_, compared with the float32 step (bfloat16 on CPU, float16 on CUDA)."""
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    critic = _critic(device)
    real = torch.randn(8, 3, 8, 8, device=device)
    fake = torch.randn(8, 3, 8, 8, device=device)
    opt = torch.optim.SGD(critic.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)

    ref = PENALTIES[name](critic, real, fake)
    ref.backward()
    ref_grads = [p.grad.clone() for p in critic.parameters() if p.grad is not None]
    opt.zero_grad()

    with torch.autocast(device.type, dtype=low):
        penalty = PENALTIES[name](critic, real, fake, scaler=scaler)
    scaler.scale(penalty).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert torch.isfinite(penalty)
    assert _rel_err(penalty.detach(), ref.detach()) < 0.05
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert _rel_err(g, r) < 0.1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf/NaN found: the step was taken
