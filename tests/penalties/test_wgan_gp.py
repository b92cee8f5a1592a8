"""gradient_penalty (WGAN-GP, WGAN-LP, zero-centred GP) against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.penalties import gradient_penalty, gradient_penalty_and_norms
from tests.penalties._reference import CASES, hand_gp, hand_interpolate, loop_norms, make_case

VARIANTS = {
    "wgan-gp": {"center": 1.0, "one_sided": False},
    "wgan-lp": {"center": 1.0, "one_sided": True},
    "zero-centred": {"center": 0.0, "one_sided": False},
    "lp-center-0.5": {"center": 0.5, "one_sided": True},
}


def _args(real, fake):
    return (real[0], fake[0]) if len(real) == 1 else (real, fake)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_matches_hand_formula_and_its_parameter_gradient(case, variant, device):
    critic, real, fake, kwargs = make_case(case, dtype=torch.float64, device=device)
    opts = VARIANTS[variant]
    gen = torch.Generator().manual_seed(5)
    out = gradient_penalty_and_norms(
        critic, *_args(real, fake), weight=3.0, critic_kwargs=kwargs, generator=gen, **opts
    )
    x_hat = hand_interpolate(real, fake, seed=5)
    want = hand_gp(critic, x_hat, kwargs, weight=3.0, **opts)
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.norms, loop_norms(critic, x_hat, kwargs).detach())
    params = list(critic.parameters())
    got_g = torch.autograd.grad(out.penalty, params, allow_unused=True, materialize_grads=True)
    want_g = torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_one_sided_ignores_norms_below_center():
    critic = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        critic.weight.fill_(0.1)  # ||w|| = 0.17 < 1
    x = torch.randn(4, 3)
    assert gradient_penalty(critic, x, x, one_sided=True).item() == 0.0
    assert gradient_penalty(critic, x, x).item() == pytest.approx(10 * (1 - 0.03**0.5) ** 2)


@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 4, 4), (6, 2, 3, 4, 5)], ids=["2d", "4d", "5d"])
def test_linear_critic_has_gradient_w_everywhere(shape, device):
    """A linear critic D(x) = <w, x> + b: every sample's gradient is w, norm ||w|| (all dims)."""
    torch.manual_seed(0)
    w = torch.randn(shape[1:], dtype=torch.float64, device=device)

    def critic(x):
        return (x * w).flatten(1).sum(1) + 0.5

    real = torch.randn(shape, dtype=torch.float64, device=device)
    fake = torch.randn(shape, dtype=torch.float64, device=device)
    out = gradient_penalty_and_norms(critic, real, fake, weight=2.0)
    norm_w = w.norm()
    torch.testing.assert_close(out.norms, norm_w.expand(shape[0]))
    torch.testing.assert_close(out.penalty, 2.0 * (norm_w - 1) ** 2)


def test_conv_norm_runs_over_every_dimension():
    """On 4-D images the norm is one per sample, not per pixel (norm(dim=1) is the known bug)."""
    critic = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1, bias=False), nn.Flatten(), nn.Softplus())
    x = torch.randn(4, 3, 6, 6)
    out = gradient_penalty_and_norms(critic, x, x)
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(xl).sum(), xl)
    assert out.norms.shape == (4,)
    torch.testing.assert_close(out.norms, g.flatten(1).norm(dim=1))
    assert not torch.allclose(g.norm(dim=1).mean((1, 2)), out.norms)  # the per-pixel bug differs


def test_real_equal_fake_makes_the_interpolate_deterministic():
    critic, real, _, _ = make_case("conv", dtype=torch.float64)
    x = real[0]
    gps = [
        gradient_penalty(critic, x, x.clone(), generator=torch.Generator().manual_seed(s))
        for s in range(3)
    ]
    want = hand_gp(critic, (x,))
    for gp in gps:
        assert torch.equal(gp, gps[0])
        torch.testing.assert_close(gp, want, rtol=1e-12, atol=0)
    assert torch.equal(gradient_penalty(critic, x, x), gps[0])  # same object: same result


def test_weight_zero_gives_zero_and_zero_gradient():
    critic, real, fake, _ = make_case("mlp")
    gp = gradient_penalty(critic, real[0], fake[0], weight=0.0)
    assert gp.item() == 0.0
    grads = torch.autograd.grad(gp, list(critic.parameters()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_generator_reproduces_and_default_rng_follows_manual_seed():
    critic, real, fake, _ = make_case("mlp")
    a = gradient_penalty(critic, real[0], fake[0], generator=torch.Generator().manual_seed(1))
    b = gradient_penalty(critic, real[0], fake[0], generator=torch.Generator().manual_seed(1))
    c = gradient_penalty(critic, real[0], fake[0], generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = gradient_penalty(critic, real[0], fake[0])
    torch.manual_seed(3)
    assert torch.equal(d, gradient_penalty(critic, real[0], fake[0]))


def test_no_side_effects_on_inputs_parameters_or_mode(device):
    critic, real, fake, _ = make_case("conv", device=device)
    real_x, fake_x = real[0].clone(), fake[0].clone().requires_grad_(True)
    before = (real_x.clone(), fake_x.detach().clone())
    first = next(critic.parameters())
    first.grad = torch.full_like(first, 7.0)
    critic.eval()
    gp = gradient_penalty(critic, real_x, fake_x)
    assert gp.requires_grad
    assert torch.equal(real_x, before[0]) and torch.equal(fake_x.detach(), before[1])
    assert not real_x.requires_grad and fake_x.requires_grad and fake_x.grad is None
    assert torch.equal(first.grad, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in list(critic.parameters())[1:])
    assert not critic.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in critic.modules())


def test_fake_with_generator_graph_is_detached():
    """The penalty is a function of the critic only: no gradient reaches the generator."""
    gen = nn.Linear(2, 6)
    critic, real, _, _ = make_case("mlp")
    fake = gen(torch.randn(5, 2))
    gp = gradient_penalty(critic, real[0], fake)
    gp.backward()
    assert gen.weight.grad is None and gen.bias.grad is None


def test_works_under_no_grad():
    critic, real, fake, _ = make_case("mlp")
    with torch.no_grad():
        gp = gradient_penalty(critic, real[0], fake[0], generator=torch.Generator().manual_seed(0))
    assert gp.requires_grad
    torch.testing.assert_close(
        gp, gradient_penalty(critic, real[0], fake[0], generator=torch.Generator().manual_seed(0))
    )


def test_grad_vs_backward_benchmark_call_stays_valid():
    """benchmarks/suites/grad_vs_backward.py calls gradient_penalty(model, inp, inp, ...)."""
    model = nn.Linear(3, 2)
    inp = torch.randn(4, 3)
    gp = gradient_penalty(model, inp, inp, weight=1.0, center=1.0)
    g = model.weight.detach().sum(0)  # d/dx of sum over both outputs
    torch.testing.assert_close(gp, (g.norm() - 1) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(5,), (5, 3), (5, 2, 3, 3), (2, 1, 1, 1, 1, 1, 1, 1, 3)], ids=["1d", "2d", "4d", "9d"]
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_tensor_fast_path_equals_the_general_path(shape, dtype, variant, device):
    """One tensor per sample takes an inlined path; a 1-tuple takes the general one. Same draw,
    interpolate, norms, penalty and parameter gradients, bit for bit (9-D inputs fall back)."""
    torch.manual_seed(0)
    w = torch.randn(shape[1:], dtype=dtype, device=device, requires_grad=True)
    lin = nn.Linear(1, 1).to(device=device, dtype=dtype)
    params = [w, lin.weight]  # the bias has no effect on input gradients

    def critic(x):
        return lin(torch.tanh((x * w).reshape(x.shape[0], -1).sum(1, keepdim=True))).squeeze(1)

    real = torch.randn(shape, dtype=dtype, device=device)
    fake = torch.randn(shape, dtype=dtype, device=device).requires_grad_(True)
    opts = VARIANTS[variant]
    outs = [
        gradient_penalty_and_norms(
            critic, r, f, weight=3.0, generator=torch.Generator().manual_seed(4), **opts
        )
        for r, f in [(real, fake), ((real,), (fake,))]
    ]
    assert torch.equal(outs[0].norms, outs[1].norms)
    assert torch.equal(outs[0].penalty, outs[1].penalty)
    grads = [torch.autograd.grad(o.penalty, params) for o in outs]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert fake.grad is None


def test_same_object_real_and_fake_still_draws_the_coefficients():
    """real is fake skips the interpolation arithmetic but not the draw, so the generator's
    stream (and anything drawn after) does not depend on whether the two are the same object."""
    critic, real, _, _ = make_case("mlp")
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    gradient_penalty(critic, real[0], real[0], generator=g1)
    torch.rand(real[0].shape[0], generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
