"""plot_diagnostics, write_tensorboard and the examples/monitor_diagnostics.py smoke run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor, plot_diagnostics, write_tensorboard

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "monitor_diagnostics.py"


def _run(
    diagnostics: tuple[str, ...], steps: int = 4, **kw: object
) -> tuple[nn.Module, GradientMonitor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with GradientMonitor(net, diagnostics=diagnostics, **kw) as monitor:  # type: ignore[arg-type]
        for _ in range(steps):
            opt.zero_grad()
            net(torch.randn(8, 4, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
    return net, monitor


def test_dashboard_has_a_panel_per_instrument_with_the_true_values() -> None:
    _, monitor = _run(("gsnr", "update_size", "distance"), every=2, steps=5)
    fig = plot_diagnostics(monitor)
    titles = [ax.get_title().splitlines()[0] for ax in fig.axes]
    assert titles == [
        "Gradient signal-to-noise ratio (GSNR)",
        "Update size ||theta_t - theta_(t-1)||",
        "Distance from start ||theta_t - theta_0||",
    ]
    for ax, name in zip(fig.axes, ("gsnr", "update_size", "distance")):
        whole = next(line for line in ax.lines if line.get_label() == "whole model")
        assert list(whole.get_xdata()) == [0, 2, 4]  # every=2: only those steps
        expected = [monitor.history[s].diagnostics[name] for s in (0, 2, 4)]
        assert list(whole.get_ydata()) == pytest.approx(expected, rel=1e-12)
        assert {line.get_label() for line in ax.lines} >= {"0", "2"}  # one line per module


def test_dashboard_from_a_state_dict_matches_the_monitor() -> None:
    _, monitor = _run(("noise_scale", "norm_test"))
    a, b = plot_diagnostics(monitor), plot_diagnostics(monitor.state_dict())
    for ax, bx in zip(a.axes, b.axes):
        ya = [list(line.get_ydata()) for line in ax.lines]
        yb = [list(line.get_ydata()) for line in bx.lines]
        assert repr(ya) == repr(yb)


def test_negative_noise_scale_estimates_are_marked_not_drawn() -> None:
    _, monitor = _run(("noise_scale",), steps=6)
    values = [r.diagnostics["noise_scale"] for r in monitor.history]
    ax = plot_diagnostics(monitor).axes[0]
    marks = [line for line in ax.lines if str(line.get_label()).startswith("estimate <= 0")]
    negative = [s for s, v in enumerate(values) if v <= 0]
    if ax.get_yscale() == "log":
        whole = next(line for line in ax.lines if line.get_label() == "whole model")
        assert all(math.isnan(y) for s, y in enumerate(whole.get_ydata()) if s in negative)
        assert (list(marks[0].get_xdata()) if marks else []) == negative
    else:  # all positive over a small range, or none positive: drawn as they are
        assert not marks


def test_dashboard_errors() -> None:
    with pytest.raises(TypeError, match="plot_diagnostics: source must be a GradientMonitor or"):
        plot_diagnostics([1, 2])  # type: ignore[arg-type]
    _, monitor = _run(())
    with pytest.raises(ValueError, match="plot_diagnostics: source must be a run with diagnostics"):
        plot_diagnostics(monitor)


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}
        self.histograms: dict[str, tuple[torch.Tensor, int]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = (value, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.histograms[tag] = (values, step)


def test_write_tensorboard_writes_scalars_and_histograms() -> None:
    net, monitor = _run(("distance",), steps=3)
    writer = _Writer()
    write_tensorboard(writer, monitor, model=net)
    assert {k: v for k, (v, _) in writer.scalars.items()} == monitor.scalars()
    assert {s for _, s in writer.scalars.values()} == {2}
    for name, p in net.named_parameters():
        torch.testing.assert_close(writer.histograms[f"grad/hist/{name}"][0], p.grad.float())
    with pytest.raises(TypeError, match="write_tensorboard: writer must be a SummaryWriter"):
        write_tensorboard(object(), monitor)


def test_write_tensorboard_to_real_event_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    net, monitor = _run(("update_size",), steps=2)
    with SummaryWriter(str(tmp_path)) as writer:
        write_tensorboard(writer, monitor, model=net, step=7)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    (event,) = events.Scalars("diagnostics/update_size")
    assert event.step == 7
    assert event.value == pytest.approx(monitor.history[-1].diagnostics["update_size"], rel=1e-6)
    assert "grad/hist/0.weight" in events.Tags()["histograms"]


def test_example_runs_and_saves_the_dashboard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("monitor_diagnostics", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.main(steps=4, every=2, batch=8, out=tmp_path)
    assert path.exists() and path.stat().st_size > 10_000
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((tmp_path / "tb").iterdir())
