"""The statistics kernels against a per-tensor reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradlab.hooks._stats import CpuStats, stats_fused


def _grads(device: torch.device) -> list[torch.Tensor]:
    g = [
        torch.randn(3, 4, device=device),
        torch.randn(12, device=device),  # same size as the first: one group on CPU
        torch.randn(5, dtype=torch.float64, device=device),
        torch.tensor([1.0, float("nan"), -2.0], device=device),
        torch.tensor([float("-inf"), 0.5, 1.0], device=device),
        torch.empty(0, device=device),
        torch.full((70000,), 3.0, dtype=torch.float16, device=device),
    ]
    return g


def _reference(g: torch.Tensor) -> list[float]:
    if g.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0]
    d = g.double()
    return [d.norm().item(), d.abs().sum().item(), d.min().item(), d.max().item()]


def _check(columns: list[list[float]], grads: list[torch.Tensor]) -> None:
    for i, g in enumerate(grads):
        ref = _reference(g)
        got = [columns[k][i] for k in range(4)]
        if g.numel() and not torch.isfinite(g).all():
            assert not math.isfinite(got[2]) or not math.isfinite(got[3])  # min/max flag it
            continue
        assert got == pytest.approx(ref, rel=1e-5), i


def test_cpu_grouped_statistics() -> None:
    grads = _grads(torch.device("cpu"))
    chunks, order = CpuStats()(grads)
    stats = torch.cat([c.double() for c in chunks], dim=1).tolist()
    assert sorted(order) == list(range(len(grads)))
    columns = [[0.0] * len(grads) for _ in range(4)]
    for col, i in enumerate(order):
        for k in range(4):
            columns[k][i] = stats[k][col]
    _check(columns, grads)


def test_fused_statistics(device: torch.device) -> None:
    grads = _grads(device)
    columns = [[t.double().item() for t in c] for c in stats_fused(grads)]
    # the fused path reports -max|g| as the minimum: compare max |g| only
    for i, g in enumerate(grads):
        ref = _reference(g)
        if g.numel():
            ref[2], ref[3] = -max(-ref[2], ref[3]), max(-ref[2], ref[3])
        if g.numel() and not torch.isfinite(g).all():
            assert not math.isfinite(columns[3][i])
            continue
        got = [columns[k][i] for k in range(4)]
        assert got == pytest.approx(ref, rel=1e-5), i
