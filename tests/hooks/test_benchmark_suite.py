"""The `hooks` benchmark suite's step variants run and leave no hooks behind (not timed here)."""

from __future__ import annotations

import torch

from benchmarks.suites.hooks import SUITE, _cnn, _mlp, make_steps
from gradlab.hooks import GradientMonitor
from tests.hooks._helpers import hook_counts


def _has_cockpit() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("cockpit", "backpack"))


def test_every_variant_runs_and_cleans_up() -> None:
    assert SUITE.name == "hooks"
    for model, inp in ((_mlp(2, 8), torch.randn(4, 8)), (_cnn(2, 4), torch.randn(2, 3, 8, 8))):
        before = hook_counts(model)
        monitors: list[GradientMonitor] = []
        steps = make_steps(model, inp, monitors)
        assert set(steps) - {"cockpit_economy"} == {
            "plain",
            "hook_floor",
            "hold_floor",
            "monitor_floor",
            "capture_all",
            "monitor",
            "nan_trace",
            "monitor_economy",
            "economy_floor",
            "retain_grad",
            "full_backward",
            "anomaly",
        }
        for step in steps.values():
            step()
        assert hook_counts(model) == before  # the monitors run on their own copies
        for monitor in monitors:
            monitor.__exit__(None, None, None)
            assert monitor.steps == 1 and monitor.first_nonfinite is None
            if monitor.diagnostics:
                assert set(monitor.history[0].diagnostics) == set(monitor.diagnostics)
        assert not torch.is_anomaly_enabled()
        if _has_cockpit():
            assert "cockpit_economy" in steps
