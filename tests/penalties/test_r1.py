"""r1_penalty / r2_penalty against the formula, and outputs= to reuse a forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab import GraphError
from gradlab.penalties import r1_penalty, r1_penalty_and_norms, r2_penalty, r2_penalty_and_norms
from tests.penalties._reference import CASES, loop_sq_norms, make_case


def _arg(xs):
    return xs[0] if len(xs) == 1 else xs


@pytest.mark.parametrize("which", ["r1", "r2"])
@pytest.mark.parametrize("case", CASES)
def test_matches_hand_formula_and_parameter_gradient(case, which, device):
    critic, real, fake, kwargs = make_case(case, dtype=torch.float64, device=device)
    xs = real if which == "r1" else fake
    fn = r1_penalty_and_norms if which == "r1" else r2_penalty_and_norms
    out = fn(critic, _arg(xs), gamma=3.0, critic_kwargs=kwargs)
    sq = loop_sq_norms(critic, xs, kwargs)
    want = 3.0 / 2 * sq.mean()
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.norms, sq.detach().sqrt())
    params = list(critic.parameters())
    got = torch.autograd.grad(out.penalty, params, allow_unused=True, materialize_grads=True)
    ref = torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_linear_critic_gives_gamma_half_norm_w_squared():
    critic = nn.Linear(4, 1)
    w = critic.weight.detach()
    x = torch.randn(7, 4)
    torch.testing.assert_close(r1_penalty(critic, x, gamma=5.0), 2.5 * (w**2).sum())
    torch.testing.assert_close(r2_penalty(critic, x, gamma=0.0), torch.tensor(0.0))


@pytest.mark.parametrize("case", ["mlp", "two-input", "conditional"])
def test_outputs_reuses_the_adversarial_forward(case):
    critic, real, _, kwargs = make_case(case, dtype=torch.float64)
    xs = tuple(x.detach().requires_grad_(True) for x in real)
    logits = critic(*xs, **kwargs)
    r1 = r1_penalty(critic, _arg(xs), outputs=logits)
    torch.testing.assert_close(r1, r1_penalty(critic, _arg(real), critic_kwargs=kwargs))
    # R1 and the adversarial loss on the same forward, one backward, as StyleGAN2 does
    (nn.functional.softplus(-logits).mean() + r1).backward()
    assert all(x.grad is not None for x in xs)  # the caller's own backward reaches xs
    assert all(p.grad is not None for p in critic.parameters())


def test_outputs_leaves_grad_untouched():
    critic, real, _, _ = make_case("mlp")
    x = real[0].detach().requires_grad_(True)
    r1_penalty(critic, x, outputs=critic(x))
    assert x.grad is None and all(p.grad is None for p in critic.parameters())


def test_outputs_errors():
    critic, real, _, _ = make_case("mlp")
    x = real[0]
    with pytest.raises(
        ValueError, match=r"r1_penalty: real must be a tensor that requires grad.*requires_grad_"
    ):
        r1_penalty(critic, x, outputs=critic(x))
    xl = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"critic_kwargs must be None when outputs= is given"):
        r1_penalty(critic, xl, outputs=critic(xl), critic_kwargs={"a": 1})
    with pytest.raises(
        ValueError, match=r"r2_penalty: outputs must be a tensor with the batch of 5 first"
    ):
        r2_penalty(critic, xl, outputs=critic(xl).mean())
    other = x.clone().requires_grad_(True)
    with pytest.raises(GraphError, match=r"does not depend on"):
        r1_penalty(critic, other, outputs=critic(xl))
    with pytest.raises(ValueError, match=r"r1_penalty: gamma must be a finite number >= 0"):
        r1_penalty(critic, x, gamma=-1.0)
    with pytest.raises(
        TypeError, match=r"r2_penalty: gamma must be a finite number >= 0, got '10'"
    ):
        r2_penalty(critic, x, gamma="10")  # type: ignore[arg-type]


def test_works_under_no_grad_and_leaves_no_trace():
    critic, real, _, _ = make_case("conv")
    x = real[0]
    with torch.no_grad():
        r1 = r1_penalty(critic, x)
    assert r1.requires_grad and not x.requires_grad
    assert all(p.grad is None for p in critic.parameters())
