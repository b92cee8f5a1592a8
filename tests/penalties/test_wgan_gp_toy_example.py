"""examples/wgan_gp_toy.py runs (a few steps) and writes its plot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wgan_gp_toy.py"


def _load():
    spec = importlib.util.spec_from_file_location("wgan_gp_toy", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eight_gaussians_has_eight_modes_on_the_paper_circle():
    example = _load()
    x = example.eight_gaussians(4000, generator=torch.Generator().manual_seed(0))
    radius = x.norm(dim=1)
    assert abs(radius.mean().item() - 2 / 1.414) < 0.01
    angles = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)).remainder(8)
    assert set(angles.long().tolist()) == set(range(8))


def test_example_runs_a_few_steps_and_saves_the_plot(tmp_path):
    example = _load()
    metrics = example.main(steps=3, out=tmp_path, width=32, batch=64, log_every=0)
    assert (tmp_path / "wgan_gp_toy.png").stat().st_size > 10_000
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["gp"] > 0 and metrics["grad_norm_mean"] > 0
