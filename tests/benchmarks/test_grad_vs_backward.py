"""The grad_vs_backward suite's first table is the tutorial's experiment exactly: its steps are
checked against the tutorial's loop written out here (not timed)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from benchmarks.suites.grad_vs_backward import TUTORIAL_SECONDS, make_steps, tutorial_steps


def _tutorial_loop(iterations: int, use_backward: bool) -> nn.Linear:
    """The tutorial's code, written out."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(1, 3, requires_grad=True)
    for _ in range(iterations):
        y = model(x).sum()
        if use_backward:
            y.backward(create_graph=True)
            g = x.grad
            assert g is not None
        else:
            (g,) = torch.autograd.grad(y, x, create_graph=True)
        gp = (g**2).sum()
        opt.zero_grad()
        gp.backward()
        opt.step()
        x.grad = None
    return model


def test_tutorial_steps_are_the_tutorials_loop() -> None:
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps, models = tutorial_steps(torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), rng)  # the seed is not left set
        assert list(steps) == ["backward", "autograd.grad"]
        for step in steps.values():
            for _ in range(20):
                step()
        for name, use_backward in (("backward", True), ("autograd.grad", False)):
            ref = _tutorial_loop(20, use_backward)
            assert torch.equal(models[name].weight, ref.weight)
            assert torch.equal(models[name].bias, ref.bias)
    # the optimizer moved the weights (the loop is not a no-op)
    torch.manual_seed(1)
    assert not torch.equal(models["backward"].weight, nn.Linear(3, 2).weight)
    assert TUTORIAL_SECONDS == {"backward": 3.5, "autograd.grad": 3.2}


def test_without_the_reset_x_grad_would_accumulate() -> None:
    """Why the tutorial resets x.grad: backward adds each iteration's gradient to x.grad."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    x = torch.ones(1, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x).sum().backward(create_graph=True)
        g1 = x.grad.detach().clone()  # type: ignore[union-attr]
        model(x).sum().backward(create_graph=True)
    assert torch.allclose(x.grad, 2 * g1)  # type: ignore[arg-type]


def test_gradlab_variants_take_the_same_steps() -> None:
    steps, models = tutorial_steps(torch.device("cpu"), gradlab_variants=True)
    assert next(iter(steps)) == "autograd.grad" and len(steps) == 4
    for step in steps.values():
        for _ in range(5):
            step()
    ref = models["autograd.grad"]
    for name, model in models.items():
        assert torch.allclose(model.weight, ref.weight, atol=1e-6), name


def test_critic_steps_agree() -> None:
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inp = torch.randn(3, 4)
    grads = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, step in make_steps(critic, inp).items():
            captured: list[torch.Tensor] = []
            hook = critic[0].weight.register_hook(lambda g, c=captured: c.append(g.clone()))
            step()
            hook.remove()
            grads[name] = captured[-1]
            assert all(p.grad is None for p in critic.parameters())  # zero_grad(set_to_none)
    assert torch.allclose(grads["backward"], grads["autograd.grad"], atol=1e-6)
    assert torch.allclose(grads["gradlab"], grads["autograd.grad"], atol=1e-6)
