"""input_gradient_norms: the core, against a per-sample loop, zero-safety, and shape properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradlab import GraphError
from gradlab.penalties import gradient_penalty, input_gradient_norms, r1_penalty
from tests.penalties._reference import CASES, loop_norms, make_case


@pytest.mark.parametrize("case", CASES)
def test_matches_per_sample_loop(case, device):
    critic, real, _, kwargs = make_case(case, dtype=torch.float64, device=device)
    xs = tuple(x.clone().requires_grad_(True) for x in real)
    norms = input_gradient_norms(critic(*xs, **kwargs), xs if len(xs) > 1 else xs[0])
    assert norms.shape == (real[0].shape[0],) and norms.grad_fn is not None
    torch.testing.assert_close(norms, loop_norms(critic, real, kwargs), rtol=1e-12, atol=1e-14)


def test_tuple_inputs_norm_is_the_norm_of_the_concatenated_gradient():
    critic, real, _, _ = make_case("two-input", dtype=torch.float64)
    xs = tuple(x.clone().requires_grad_(True) for x in real)
    norms = input_gradient_norms(critic(*xs), xs)
    g = torch.autograd.grad(critic(*xs).sum(), xs)
    flat = torch.cat([gi.flatten(1) for gi in g], dim=1)
    torch.testing.assert_close(norms, flat.norm(dim=1), rtol=1e-12, atol=0)


def test_several_outputs_per_sample_are_summed():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 2)
    norms = input_gradient_norms(x @ w, x)  # PatchGAN-like (B, 2) scores
    torch.testing.assert_close(norms, w.sum(1).norm().expand(4))


def test_create_graph_false_gives_detached_norms():
    critic, real, _, _ = make_case("mlp")
    x = real[0].clone().requires_grad_(True)
    norms = input_gradient_norms(critic(x), x, create_graph=False)
    assert norms.grad_fn is None and not norms.requires_grad
    torch.testing.assert_close(norms, input_gradient_norms(critic(x), x).detach())


class _ReluCritic(nn.Module):
    """D(x) = sum(w * relu(x)): the input gradient is exactly 0 where x < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64))

    def forward(self, x):
        return (self.w * torch.relu(x)).sum(1)


def test_zero_gradient_gives_finite_double_backward():
    critic = _ReluCritic()
    x = torch.tensor([[-1.0, -2.0, -0.5], [1.0, -1.0, 2.0], [0.3, 0.2, -4.0]], dtype=torch.float64)
    xl = x.clone().requires_grad_(True)
    norms = input_gradient_norms(critic(xl), xl)
    assert norms[0] == 0.0
    ((norms - 1) ** 2).mean().backward()
    assert torch.isfinite(critic.w.grad).all()
    # the zero-gradient sample contributes the subgradient 0; the rest as the formula says
    w = critic.w.detach().clone().requires_grad_(True)
    ref = sum(((w * (x[i] > 0)).norm() - 1) ** 2 for i in (1, 2)) / 3
    (want,) = torch.autograd.grad(ref, w)
    torch.testing.assert_close(critic.w.grad, want)


@pytest.mark.parametrize("penalty", ["gp", "zero-centred", "r1"])
def test_penalties_are_finite_where_every_gradient_is_zero(penalty):
    critic = nn.Linear(3, 1)
    with torch.no_grad():
        critic.weight.zero_()
    x = torch.randn(4, 3)
    if penalty == "r1":
        p = r1_penalty(critic, x)
    else:
        p = gradient_penalty(critic, x, x, center=1.0 if penalty == "gp" else 0.0)
    p.backward()
    assert torch.isfinite(critic.weight.grad).all()
    assert p.item() == (10.0 if penalty == "gp" else 0.0)


def test_naive_norm_is_nan_where_the_zero_safe_one_is_finite():
    """The bug the zero-safe norm guards against (NVlabs/stylegan2-ada-pytorch#133)."""
    critic = nn.Linear(3, 1)
    with torch.no_grad():
        critic.weight.zero_()
    x = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    ((g.square().sum(1).sqrt() - 1) ** 2).mean().backward()
    assert torch.isnan(critic.weight.grad).all()
    critic.weight.grad = None
    gradient_penalty(critic, x.detach(), x.detach()).backward()
    assert torch.equal(critic.weight.grad, torch.zeros_like(critic.weight))


def test_errors():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=r"input_gradient_norms: outputs must be a tensor with the batch of 4 first",
    ):
        input_gradient_norms(x.sum(), x)
    with pytest.raises(
        ValueError,
        match=r"outputs must be a tensor with the batch of 4 first.*got tensor\(shape=\(3,\)",
    ):
        input_gradient_norms(x.sum(0), x)
    with pytest.raises(ValueError, match=r"inputs must be a tensor that requires grad"):
        input_gradient_norms(x.sum(1), x.detach())
    y = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(GraphError, match=r"does not depend on"):
        input_gradient_norms(x.sum(1), (x, y))
    with pytest.raises(GraphError, match=r"does not require grad"):
        input_gradient_norms(x.detach().sum(1), x)
    with pytest.raises(
        TypeError, match=r"inputs\[1\] must be a floating-point tensor .*torch.int64"
    ):
        input_gradient_norms(x.sum(1), (x, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler"):
        input_gradient_norms(x.sum(1), x, scaler=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inputs must be a tensor or a non-empty tuple"):
        input_gradient_norms(x.sum(1), [])


@st.composite
def _shapes(draw):
    batch = draw(st.integers(1, 4))
    n_inputs = draw(st.integers(1, 2))
    sample_shapes = [
        tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))) for _ in range(n_inputs)
    ]
    return batch, sample_shapes


@given(_shapes(), st.integers(0, 2**16))
def test_property_norms_of_elementwise_critic_match_closed_form(shapes, seed):
    """D(x) = sum_k <w_k, tanh(x_k)>: grad_k = w_k (1 - tanh(x_k)^2), over any shapes/inputs."""
    batch, sample_shapes = shapes
    g = torch.Generator().manual_seed(seed)
    xs = tuple(
        torch.randn((batch, *s), generator=g, dtype=torch.float64).requires_grad_(True)
        for s in sample_shapes
    )
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in sample_shapes]
    out = sum((w * torch.tanh(x)).reshape(batch, -1).sum(1) for w, x in zip(ws, xs))
    norms = input_gradient_norms(out, xs if len(xs) > 1 else xs[0])
    sq = sum(
        ((w * (1 - torch.tanh(x.detach()) ** 2)) ** 2).reshape(batch, -1).sum(1)
        for w, x in zip(ws, xs)
    )
    assert norms.shape == (batch,)
    torch.testing.assert_close(norms, sq.sqrt(), rtol=1e-12, atol=1e-14)
    gp = gradient_penalty(
        lambda *a: sum((w * torch.tanh(x)).reshape(batch, -1).sum(1) for w, x in zip(ws, a)),
        tuple(x.detach() for x in xs) if len(xs) > 1 else xs[0].detach(),
        tuple(x.detach() for x in xs) if len(xs) > 1 else xs[0].detach(),
        weight=1.0,
    )
    torch.testing.assert_close(gp, ((sq.sqrt() - 1) ** 2).mean(), rtol=1e-12, atol=1e-14)
