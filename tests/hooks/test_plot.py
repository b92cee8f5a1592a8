"""plot_grad_flow and grad_flow_table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor, grad_flow_table, plot_grad_flow

pytest.importorskip("matplotlib")


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 1))
    model[2].bias.requires_grad_(False)  # a frozen bias: grad stays None
    return model


def test_table_from_model_handles_biases_and_none() -> None:
    model = _model()
    model(torch.randn(5, 3)).sum().backward()
    table = grad_flow_table(model)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "norm", "max|g|", "mean|g|", "flag"]
    assert [line.split()[0] for line in lines[1:]] == [n for n, _ in model.named_parameters()]
    assert lines[4].split() == ["2.bias", "-", "-", "-", "no", "grad"]
    norm = float(lines[-1].split()[1])  # 3.bias: d sum / d b = batch size
    assert norm == pytest.approx(5.0, rel=1e-4)


def test_table_from_monitor_flags() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.zero_()  # layer 0 outputs zeros, so layer 1's weight gradient is 0
        model[0].bias.zero_()
    with GradientMonitor(model, exploding=2.0) as monitor:
        model(torch.ones(4, 3)).sum().backward()
        model(torch.full((4, 3), float("nan"))).sum().backward()
    first = grad_flow_table(monitor, step=0)
    row = {line.split()[0]: line.split() for line in first.splitlines()[1:]}
    assert row["1.weight"][-1] == "vanishing"
    assert row["1.bias"][-1] == "exploding"  # d sum / d b = 4 > 2
    assert row["0.weight"][-1] != "vanishing"
    outputs = grad_flow_table(monitor, kind="outputs", step=-1)
    assert "NaN/Inf" not in outputs  # NaN forward: output gradients stay finite here
    assert "NaN/Inf" in grad_flow_table(monitor)  # but the weight gradients are NaN


def test_figure_from_monitor_and_model() -> None:
    from matplotlib.figure import Figure

    model = _model()
    with GradientMonitor(model) as monitor:
        for _ in range(3):
            model(torch.randn(5, 3)).pow(2).mean().backward()
    fig = plot_grad_flow(monitor)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [n for n in monitor.history[-1].params]  # biases included
    assert ax.get_yscale() == "log"
    heat = fig.axes[1].images[0].get_array()
    assert heat.shape == (3, len(labels))
    norms = [s.norm for s in monitor.history[0].params.values()]
    assert [float(v) for v in heat[0]] == pytest.approx([math.log10(n) for n in norms])
    fig2 = plot_grad_flow(model, log=False)  # a bare model, with a None grad: no crash
    labels2 = [t.get_text() for t in fig2.axes[0].get_xticklabels()]
    assert "2.bias (no grad)" in labels2 and len(fig2.axes) == 1
    fig3 = plot_grad_flow(monitor, kind="outputs", step=0)
    assert [t.get_text() for t in fig3.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_bad_arguments() -> None:
    model = _model()
    with pytest.raises(ValueError, match="plot_grad_flow: kind='outputs' needs a GradientMonitor"):
        plot_grad_flow(model, kind="outputs")
    with pytest.raises(TypeError, match="grad_flow_table: source must be a GradientMonitor"):
        grad_flow_table([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_flow_table: kind must be"):
        grad_flow_table(model, kind="weights")  # type: ignore[arg-type]
    monitor = GradientMonitor(model)
    with pytest.raises(ValueError, match="plot_grad_flow: the monitor has recorded no backward"):
        plot_grad_flow(monitor)
    with monitor:
        model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="grad_flow_table: step=5 is out of range for 1"):
        grad_flow_table(monitor, step=5)


def test_heat_map_ticks_are_the_integer_step_numbers() -> None:
    model = _model()
    with GradientMonitor(model, history_size=4) as monitor:
        for _ in range(7):
            model(torch.randn(5, 3)).sum().backward()
    fig = plot_grad_flow(monitor)
    heat = fig.axes[1]
    ticks = [float(t) for t in heat.get_yticks()]
    lo, hi = sorted(heat.get_ylim())
    shown = [t for t in ticks if lo <= t <= hi]
    assert shown and all(t == int(t) for t in ticks)
    assert set(shown) <= {3.0, 4.0, 5.0, 6.0}  # the steps the bounded history kept
    assert (lo, hi) == (2.5, 6.5)


def test_values_below_the_vanishing_threshold_are_drawn_where_they_are() -> None:
    """A 1e-12 gradient is drawn at 1e-12 (not at the threshold), the threshold as a line."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[1].weight.fill_(1e-12)  # layer 0's gradients are ~1e-12: far below 1e-7
    with GradientMonitor(model) as monitor:
        model(torch.ones(3, 2, dtype=torch.float64)).sum().backward()
    rec = monitor.history[0]
    fig = plot_grad_flow(monitor)
    ax = fig.axes[0]
    norms = next(line for line in ax.lines if line.get_label() == "L2 norm").get_ydata()
    expected = [s.norm for s in rec.params.values()]
    assert list(norms) == pytest.approx(expected, rel=1e-12)
    assert min(norms) < 1e-10  # below the threshold, drawn as it is
    lo, _ = ax.get_ylim()
    assert lo < min(norms)  # inside the axes
    threshold = next(line for line in ax.lines if str(line.get_label()).startswith("vanishing"))
    assert list(threshold.get_ydata()) == [1e-7, 1e-7]
    tops = [p.get_y() + p.get_height() for p in ax.patches]
    assert tops == pytest.approx([s.max_abs for s in rec.params.values()], rel=1e-9)


def test_exact_zero_is_marked_on_the_bottom_edge() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[1].weight.zero_()  # layer 0's gradients are exactly 0
    with GradientMonitor(model) as monitor:
        model(torch.ones(3, 2, dtype=torch.float64)).sum().backward()
    ax = plot_grad_flow(monitor).axes[0]
    zero = next(line for line in ax.lines if line.get_label() == "norm exactly 0")
    assert list(zero.get_xdata()) == [0, 1]  # 0.weight, 0.bias
    assert list(zero.get_ydata()) == [ax.get_ylim()[0]] * 2


def test_plot_step_must_be_an_int() -> None:
    model = _model()
    with GradientMonitor(model) as monitor:
        model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(TypeError, match="plot_grad_flow: step must be an int, got 'last'"):
        plot_grad_flow(monitor, step="last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_flow_table: kind must be one of"):
        grad_flow_table(monitor, kind="param")  # type: ignore[arg-type]
