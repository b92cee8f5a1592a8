"""LazyRegularizer: schedule, gain and StyleGAN2's Adam adjustment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.penalties import LazyRegularizer, r1_penalty


@pytest.mark.parametrize("every", [1, 4, 16])
def test_schedule_and_gain(every):
    lazy = LazyRegularizer(every=every)
    due = [s for s in range(40) if lazy.is_due(s)]
    assert due == list(range(0, 40, every))
    assert lazy.gain == every


def test_adam_adjustment_is_stylegan2s():
    lazy = LazyRegularizer(every=16)
    c = 16 / 17
    h = lazy.adam_hyperparameters(0.002, (0.0, 0.99))
    assert h.lr == pytest.approx(0.002 * c)
    assert h.betas == pytest.approx((0.0, 0.99**c))
    opt = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=h.lr, betas=h.betas)
    assert opt.param_groups[0]["lr"] == h.lr


def test_lazy_r1_sums_to_the_every_step_penalty_over_a_period():
    """With a fixed critic and batch, k steps of the lazy penalty give the same total gradient."""
    critic = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(6, 3)
    lazy = LazyRegularizer(every=4)
    for step in range(4):
        if lazy.is_due(step):
            (lazy.gain * r1_penalty(critic, x)).backward()
    lazy_grad = critic[0].weight.grad.clone()
    critic.zero_grad()
    for _ in range(4):
        r1_penalty(critic, x).backward()
    torch.testing.assert_close(lazy_grad, critic[0].weight.grad)


def test_errors():
    with pytest.raises(
        ValueError, match=r"LazyRegularizer: every must be an int >= 1, got 0\. Pass"
    ):
        LazyRegularizer(every=0)
    with pytest.raises(TypeError, match=r"every must be an int >= 1, got 2.5"):
        LazyRegularizer(every=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"is_due: step must be an int >= 0, got -1"):
        LazyRegularizer(every=2).is_due(-1)
    with pytest.raises(ValueError, match=r"betas must be a pair"):
        LazyRegularizer(every=2).adam_hyperparameters(0.1, (0.9,))  # type: ignore[arg-type]
    assert repr(LazyRegularizer(every=3)) == "LazyRegularizer(every=3)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, r"lr must be a finite number >= 0, got -1.0\. Pass"),
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number >= 0, got nan"),
        ({"lr": "0.1"}, TypeError, r"lr must be a finite number >= 0, got '0.1'"),
        (
            {"lr": 0.1, "betas": (0.9, 1.5)},
            ValueError,
            r"betas\[1\] must be a finite number in \[0, 1\), got 1.5\. Adam",
        ),
        (
            {"lr": 0.1, "betas": (-0.1, 0.9)},
            ValueError,
            r"betas\[0\] must be a finite number in \[0, 1\), got -0.1",
        ),
        (
            {"lr": 0.1, "betas": None},
            TypeError,
            r"betas must be a pair \(beta1, beta2\), got None\. Pass",
        ),
        (
            {"lr": 0.1, "betas": (0.9, "x")},
            TypeError,
            r"betas\[1\] must be a finite number in \[0, 1\), got \'x\'",
        ),
    ],
    ids=[
        "negative-lr",
        "nan-lr",
        "str-lr",
        "beta2-above-1",
        "negative-beta1",
        "betas-none",
        "beta-str",
    ],
)
def test_adam_hyperparameters_refuse_what_adam_refuses(kwargs, error, message):
    """Values torch.optim.Adam itself refuses are refused here, naming the argument and the fix,
    instead of being adjusted into numbers Adam then rejects (or worse, accepts)."""
    with pytest.raises(error, match=r"LazyRegularizer\.adam_hyperparameters: " + message):
        LazyRegularizer(every=4).adam_hyperparameters(**kwargs)
    if "betas" in kwargs and error is ValueError:  # the reference: Adam refuses them too
        with pytest.raises(ValueError):
            torch.optim.Adam(nn.Linear(1, 1).parameters(), **kwargs)


def test_adam_hyperparameters_accept_the_edges():
    h = LazyRegularizer(every=1).adam_hyperparameters(lr=0.0, betas=[0.0, 0])
    assert h == (0.0, (0.0, 0.0))
