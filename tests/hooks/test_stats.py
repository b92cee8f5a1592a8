"""The statistics kernels against a per-tensor float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradlab.hooks._stats import ROWS, CpuStats, stats_fused


def _grads(device: torch.device) -> list[torch.Tensor]:
    g = [
        torch.randn(3, 4, device=device),
        torch.randn(12, device=device),  # same size as the first: one group on CPU
        torch.randn(5, dtype=torch.float64, device=device),
        torch.tensor([1.0, float("nan"), -2.0], device=device),
        torch.tensor([float("-inf"), 0.5, 1.0], device=device),  # same size: a group with NaN
        torch.empty(0, device=device),
        torch.full((70000,), 3.0, dtype=torch.float16, device=device),
        torch.randn(40, 30, device=device).t(),  # not contiguous
    ]
    return g


def _reference(g: torch.Tensor) -> list[float]:
    if g.numel() == 0:
        return [0.0, 0.0, 0.0]
    d = g.double()
    return [d.square().sum().item(), d.abs().sum().item(), d.abs().max().item()]


def _check(columns: list[list[float]], grads: list[torch.Tensor]) -> None:
    for i, g in enumerate(grads):
        ref = _reference(g)
        got = [columns[k][i] for k in range(ROWS)]
        if g.isnan().any():
            assert all(math.isnan(v) for v in got), i  # every statistic propagates NaN
            continue
        if g.isinf().any():
            assert got[0] == got[1] == got[2] == math.inf, i
            continue
        assert got == pytest.approx(ref, rel=1e-5), i


def test_cpu_grouped_statistics() -> None:
    grads = _grads(torch.device("cpu"))
    chunks, order = CpuStats()(grads)
    assert all(c.shape[0] == ROWS for c in chunks)
    stats = torch.cat([c.double() for c in chunks], dim=1).tolist()
    assert sorted(order) == list(range(len(grads)))
    columns = [[0.0] * len(grads) for _ in range(ROWS)]
    for col, i in enumerate(order):
        for k in range(ROWS):
            columns[k][i] = stats[k][col]
    _check(columns, grads)


def test_cpu_single_gradient_statistics() -> None:
    grads = [g for g in _grads(torch.device("cpu")) if g.numel()]
    stats = CpuStats()
    columns = [[0.0] * len(grads) for _ in range(ROWS)]
    for i, g in enumerate(grads):
        for k, v in enumerate(stats.one(g)):
            assert v.dim() == 0
            columns[k][i] = v.double().item()
    _check(columns, grads)
    assert columns[1][len(grads) - 2] == 210000.0  # float16: L1 accumulated in float32


def test_fused_statistics(device: torch.device) -> None:
    grads = _grads(device)
    columns = [[t.double().item() for t in c] for c in stats_fused(grads)]
    assert len(columns) == ROWS
    _check(columns, grads)
