"""per_sample_grads against a loop of torch.autograd.grad, and the AMP scaler of the engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradlab.per_sample import PerSampleGradients, per_sample_grads
from tests.per_sample._reference import reference_grads

TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def test_per_sample_grads_matches_a_loop_and_leaves_params_alone(device) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (6,), device=device)
    params = dict(model.named_parameters())
    before = {n: p.clone() for n, p in params.items()}

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    got = per_sample_grads(loss, params, x, y)
    chunked = per_sample_grads(loss, params, x, y, chunk_size=4)
    want = reference_grads(model, F.cross_entropy, x, y, loop=True)
    torch.testing.assert_close(got, want, **TOL64)
    torch.testing.assert_close(chunked, want, **TOL64)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in params.items())


def test_scaler_gives_unscaled_statistics() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with PerSampleGradients(model, stats=("grad", "sum_sq", "dot"), scaler=scaler) as ps:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    want = reference_grads(model, F.cross_entropy, x, y)
    torch.testing.assert_close(ps.grad, want, **TOL64)
    norm = torch.stack([g.flatten(1).square().sum(1) for g in want.values()]).sum(0).sqrt()
    torch.testing.assert_close(ps.norm, norm, **TOL64)
    v = {n: torch.ones_like(g[0]) for n, g in want.items()}
    dot = sum(g.flatten(1).sum(1) for g in want.values())
    torch.testing.assert_close(ps.dot(v), dot, **TOL64)


def test_bfloat16_autocast_statistics_in_float32() -> None:
    """Under CPU autocast (bfloat16 matmuls) the statistics come out in float32 and agree with
    float64 to bfloat16's precision (eps 2**-8; 3e-2 relative to the largest norm leaves room
    for the rounding of the forward and the backward)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    want = reference_grads(model.double(), F.cross_entropy, x.double(), y)
    model.float()
    with PerSampleGradients(model, stats=("grad",)) as ps:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    norm = torch.stack([g.flatten(1).square().sum(1) for g in want.values()]).sum(0).sqrt()
    assert ps.norm.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in ps.grad.values())
    scale = norm.abs().max().item()
    torch.testing.assert_close(ps.norm.double(), norm, rtol=0, atol=3e-2 * scale)
