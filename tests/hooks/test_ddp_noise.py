"""The DDP noise scale: 2 gloo processes against the formula computed here from the same shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor
from tests._distributed import run_gloo

_B = 6  # samples per rank


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
    ).double()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return (
        torch.randn(_B, 4, dtype=torch.float64, generator=g),
        torch.randn(_B, 2, dtype=torch.float64, generator=g),
    )


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _steps(rank: int, tmp: str) -> None:
    """One rank's steps (its DDP wrapper is freed when it returns, before the teardown)."""
    # tiny buckets: several all-reduces per step, the batch all-reduce rides on the last one
    ddp = nn.parallel.DistributedDataParallel(_net(), bucket_cap_mb=1e-4)
    grads = []
    # with the per-sample noise scale as well: each rank's own samples, both reported
    diagnostics = ("ddp_noise_scale", "noise_scale")
    with GradientMonitor(ddp, diagnostics=diagnostics, every=2) as monitor:
        for step in range(3):  # step 1: no diagnostics, DDP's plain all-reduce
            ddp.zero_grad()
            _loss(ddp, _batch(rank, step)).backward()
            grads.append([p.grad.clone() for p in ddp.parameters()])
    ddp.zero_grad()
    _loss(ddp, _batch(rank, 3)).backward()  # after the context: DDP's plain averaging
    grads.append([p.grad.clone() for p in ddp.parameters()])
    torch.save(
        {
            "values": [r.diagnostics for r in monitor.history],
            "by_module": [r.diagnostics_by_module for r in monitor.history],
            "scalars": monitor.scalars(),
            "grads": grads,
        },
        f"{tmp}/rank{rank}.pt",
    )


def _reference(step: int, world: int) -> tuple[float, list[torch.Tensor]]:
    net = _net()
    local = []
    for r in range(world):
        g = torch.autograd.grad(_loss(net, _batch(r, step)), list(net.parameters()))
        local.append(torch.cat([t.reshape(-1) for t in g]))
    small_sq = sum(float(g.square().sum()) for g in local) / world  # |G_small|^2, B_small = _B
    mean = sum(local) / world
    big_sq = float(mean.square().sum())  # |G_big|^2, B_big = world * _B
    b_small, b_big = _B, world * _B
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    return s / g2, [t.reshape(shape) for t, shape in zip(mean.split(sizes), shapes)]


def _per_sample_noise_scale(rank: int, step: int) -> float:
    """B_simple of rank's own batch from vmap(grad) per-sample gradients."""
    from tests.per_sample._reference import reference_grads

    x, y = _batch(rank, step)
    grads = reference_grads(_net(), lambda out, t: (out - t).pow(2).mean(), x, y)
    g = torch.cat([t.flatten(1) for t in grads.values()], dim=1)
    b, m = g.shape[0], g.mean(0)
    s = float(((g - m) ** 2).sum()) / (b - 1)
    return s / (float(m @ m) - s / b)


def test_ddp_noise_scale_equals_the_two_batch_formula(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_gloo(_steps, (str(tmp_path),), tmp_path, fork_server=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [bool(v) for v in got["values"]] == [True, False, True]
        for step in range(4):
            expected, mean = _reference(step, 2)
            for g, m in zip(got["grads"][step], mean):  # DDP's averaged gradient, unchanged
                torch.testing.assert_close(g, m, rtol=1e-12, atol=1e-15)
            if step in (0, 2):
                value = got["values"][step]["ddp_noise_scale"]
                assert value == pytest.approx(expected, rel=1e-10)
                local = got["values"][step]["noise_scale"]
                assert local == pytest.approx(_per_sample_noise_scale(rank, step), rel=1e-10)
        assert "ddp_noise_scale" not in got["by_module"][0]  # whole model only
        assert set(got["by_module"][0]["noise_scale"]) == {"module.0", "module.2", "module.4"}
        assert got["scalars"]["diagnostics/ddp_noise_scale"] == got["values"][2]["ddp_noise_scale"]


def test_ddp_noise_scale_needs_a_ddp_model() -> None:
    with pytest.raises(ValueError, match="model must be a DistributedDataParallel model"):
        GradientMonitor(_net(), diagnostics=("ddp_noise_scale",))
