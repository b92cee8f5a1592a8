"""Mixed precision: scaler= follows PyTorch's AMP gradient-penalty recipe, for every registered
penalty (the checks are in ``_shared``), plus input_gradient_norms and path length.

CPU: bfloat16 autocast with a GradScaler (enabled on CPU in torch >= 2.3); CUDA (when present, via
the ``device`` fixture): float16 autocast with a GradScaler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.penalties import PENALTIES, input_gradient_norms, path_length_penalty
from tests.penalties._shared import (
    SpyScaler,
    check_autocast_training_step,
    check_power_of_two_scale_is_exact,
    conv_critic,
)

ENTRIES = [pytest.param(e, id=e.name) for e in PENALTIES.values()]


@pytest.mark.parametrize("entry", ENTRIES)
def test_power_of_two_scale_is_exact_in_float32(entry):
    check_power_of_two_scale_is_exact(entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_autocast_with_grad_scaler_training_step(entry, device):
    check_autocast_training_step(entry, device)


def test_disabled_scaler_is_ignored_and_core_and_path_length_accept_one():
    scaler = SpyScaler("cpu", enabled=False)
    critic = conv_critic()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    norms = input_gradient_norms(critic(x), x, scaler=scaler)
    assert scaler.scaled == [] and norms.shape == (2,)
    w = torch.randn(2, 4, requires_grad=True)
    images = torch.tanh(nn.Linear(4, 48)(w)).view(2, 3, 4, 4)
    on = SpyScaler("cpu", init_scale=2.0**8)
    a = path_length_penalty(images, w, mean=0.0, scaler=on, generator=1)
    b = path_length_penalty(images, w, mean=0.0, generator=torch.Generator().manual_seed(1))
    assert len(on.scaled) == 1 and torch.equal(a.penalty, b.penalty)
