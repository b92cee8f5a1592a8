"""A second backward pass through a context's graph (a gradient penalty: autograd.grad with
create_graph=True, then backward; or two backward calls) has no per-sample statistics: the
reads raise a GradlabError that says why, nothing raises inside the backward pass, and the
model's ``.grad`` is that of a plain run, bit for bit."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradlab._errors import GradlabError
from gradlab.per_sample import PerSampleGradients


def _tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))


def _linear() -> nn.Module:
    # the input gradient does not depend on the activations: the penalty's backward reaches
    # the parameters without passing any module output (only parameter hooks fire)
    return nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 1))


def _with_fallback() -> nn.Module:
    # PReLU has no closed-form rule: replayed by torch.func
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 1))


def _penalty_step(model: nn.Module, x: torch.Tensor) -> None:
    """A WGAN-GP-style step: critic score plus the squared input-gradient norm."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (out.mean() + g.square().sum(1).mean()).backward()


def _two_backward_calls(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out.square().mean().backward(retain_graph=True)
    out.mean().backward()


@pytest.mark.parametrize("step", [_penalty_step, _two_backward_calls], ids=["penalty", "twice"])
@pytest.mark.parametrize("factory", [_tanh_mlp, _linear, _with_fallback])
@pytest.mark.parametrize("stats", [("norm",), ("norm", "sum_sq", "dot_mean"), ("grad", "dot")])
def test_reads_refuse_a_second_backward_pass(
    factory: Callable[[], nn.Module],
    step: Callable[[nn.Module, torch.Tensor], None],
    stats: tuple[str, ...],
    device: str,
) -> None:
    torch.manual_seed(0)
    model = factory().double().to(device)
    twin = copy.deepcopy(model)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    with PerSampleGradients(model, stats=stats) as ps:
        step(model, x)  # no exception inside the backward passes or at exit
    with pytest.raises(GradlabError, match="second backward pass"):
        _ = ps.norm
    step(twin, x)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad)
    ps.close()


def test_one_pass_with_create_graph_is_fine(device: str) -> None:
    """backward(create_graph=True) is one pass: its statistics are there."""
    torch.manual_seed(0)
    model = _tanh_mlp().double().to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    twin = copy.deepcopy(model)
    with PerSampleGradients(model) as ps:
        model(x).square().mean().backward(create_graph=True)
    expected = []
    for i in range(5):  # l_i = out_i^2 (one output): the batch loss is their mean
        grads = torch.autograd.grad(twin(x[i : i + 1]).square().sum(), list(twin.parameters()))
        expected.append(torch.cat([g.flatten() for g in grads]).norm())
    torch.testing.assert_close(ps.norm, torch.stack(expected), rtol=1e-10, atol=1e-12)
    for p in model.parameters():
        p.grad = None  # the graph the gradients hold (create_graph) goes with them
