"""GradientMonitor(histogram_bins=...): gradient element histograms against numpy's histogram of
the same ``.grad``, the ``every`` schedule, and what write_tensorboard hands the writer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradlab.hooks import GradHistogram, GradientMonitor, write_tensorboard
from tests.hooks._helpers import cnn, input_for, mlp


class _Writer:
    """Records what it is given (stands in for a SummaryWriter)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, int]] = []
        self.raw: list[tuple[str, int, tuple[object, ...]]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, step))

    def add_histogram_raw(self, tag: str, *args: object) -> None:
        self.raw.append((tag, int(args[-1]), args[:-1]))  # type: ignore[call-overload]


def _check(h: GradHistogram, grad: torch.Tensor, bins: int, step: int) -> None:
    g = grad.detach().flatten().cpu().numpy()
    assert h.step == step
    assert (h.min, h.max, h.num) == (float(g.min()), float(g.max()), g.size)
    assert h.sum == pytest.approx(float(g.sum()), rel=1e-12, abs=1e-15)
    assert h.sum_squares == pytest.approx(float((g * g).sum()), rel=1e-12)
    counts, edges = np.histogram(g, bins=bins, range=(float(g.min()), float(g.max())))
    assert h.bucket_counts == [0.0, *counts.astype(float).tolist()]
    assert h.bucket_limits == pytest.approx(edges.tolist(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("factory", [mlp, cnn], ids=["mlp", "cnn"])
def test_histograms_equal_numpys_of_each_grad(factory, device) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = factory().to(device)
    with GradientMonitor(model, histogram_bins=10) as monitor:
        model(input_for(model, device, batch=6)).pow(2).mean().backward()
    hists = monitor.grad_histograms
    assert list(hists) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert p.grad is not None
        _check(hists[name], p.grad, 10, 0)


def test_every_k_keeps_the_latest_histogram_step_only() -> None:
    torch.manual_seed(0)
    model = mlp()
    with GradientMonitor(model, histogram_bins=7, every=2) as monitor:
        for step in range(4):
            model.zero_grad()
            model(input_for(model, torch.device("cpu"))).pow(2).mean().backward()
            hists = monitor.grad_histograms
            assert {h.step for h in hists.values()} == {step - step % 2}
            if step % 2 == 0:
                for name, p in model.named_parameters():
                    assert p.grad is not None
                    _check(hists[name], p.grad, 7, step)
    assert GradientMonitor(model).grad_histograms == {}  # not asked for


def test_constant_and_nonfinite_gradients() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with GradientMonitor(model, histogram_bins=4, trace_nonfinite=False) as monitor:
        model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
        bias = monitor.grad_histograms["0.bias"]  # every element is 2.0
        assert (bias.min, bias.max) == (2.0, 2.0)
        assert bias.bucket_limits == [1.5, 1.75, 2.0, 2.25, 2.5]
        assert bias.bucket_counts == [0.0, 0.0, 0.0, 2.0, 0.0]
        model.zero_grad()
        (model(torch.ones(2, 3, dtype=torch.float64)) * math.nan).sum().backward()
    assert monitor.grad_histograms == {}  # NaN gradients get none


def test_write_tensorboard_writes_the_kept_histograms_raw() -> None:
    torch.manual_seed(0)
    model = mlp()
    writer = _Writer()
    with GradientMonitor(model, histogram_bins=5, every=2) as monitor:
        for _ in range(3):
            model.zero_grad()
            model(input_for(model, torch.device("cpu"))).pow(2).mean().backward()
            write_tensorboard(writer, monitor)
    names = [n for n, _ in model.named_parameters()]
    assert [(t, s) for t, s, _ in writer.raw] == [
        (f"grad/hist/{n}", s) for s in (0, 2) for n in names
    ]
    h = monitor.grad_histograms[names[0]]
    assert writer.raw[len(names)][2] == tuple(h)[1:]  # the fields after step, in order
    with pytest.raises(ValueError, match=r"write_tensorboard: model= writes histograms.*drop"):
        write_tensorboard(writer, monitor, model=model)

    class ScalarsOnly:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            pass

    with pytest.raises(TypeError, match=r"write_tensorboard: writer must be a SummaryWriter with"):
        write_tensorboard(ScalarsOnly(), monitor)


def test_a_real_summary_writer_reads_back_the_counts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = mlp()
    with SummaryWriter(str(tmp_path)) as writer, GradientMonitor(model, histogram_bins=8) as mon:
        model(input_for(model, torch.device("cpu"), batch=16)).pow(2).mean().backward()
        write_tensorboard(writer, mon)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    (event,) = acc.Histograms("grad/hist/0.weight")
    grad = model[0].weight.grad
    assert grad is not None
    counts, _ = np.histogram(grad.numpy(), bins=8)
    assert list(event.histogram_value.bucket) == [0.0, *counts.astype(float).tolist()]


@pytest.mark.parametrize("bins", [0, -3, 2.5, "64"], ids=str)
def test_bad_histogram_bins(bins: object) -> None:
    with pytest.raises((TypeError, ValueError), match=r"GradientMonitor: histogram_bins must"):
        GradientMonitor(mlp(), histogram_bins=bins)  # type: ignore[arg-type]
