"""GradientMonitor: statistics against references, NaN tracing, flags, hygiene."""

from __future__ import annotations

import gc
import math
import re
import tracemalloc
import weakref

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor, LayerStats, NonfiniteSource
from gradlab.hooks import _stats as _stats_module
from tests.hooks._helpers import (
    NaNBackward,
    NaNLayer,
    cnn,
    hook_counts,
    input_for,
    mlp,
    reference_grads,
)


def _stats(g: torch.Tensor) -> LayerStats:
    return LayerStats(g.norm().item(), g.abs().max().item(), g.abs().mean().item())


def _close(a: LayerStats, b: LayerStats) -> None:
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("factory", [mlp, cnn], ids=["mlp", "cnn"])
def test_statistics_match_references(factory, device: torch.device) -> None:
    model = factory(inplace=True).to(device)
    x = input_for(model, device)
    ref_out, _ = reference_grads(model, x)
    with GradientMonitor(model) as monitor:
        model(x).pow(2).sum().backward()
    (rec,) = monitor.history
    assert rec.step == 0 and list(rec.outputs) == [str(i) for i in range(len(model))]
    for i, ref in enumerate(ref_out):
        _close(rec.outputs[str(i)], _stats(ref))
    assert list(rec.params) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        _close(rec.params[n], _stats(p.grad))
    assert rec.vanishing == rec.exploding == rec.nonfinite == ()
    assert rec.source is None and monitor.first_nonfinite is None


def test_every_backward_is_a_step(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device)
    with GradientMonitor(model) as monitor:
        for k in range(3):
            model.zero_grad()
            ((k + 1) * model(x).sum()).backward()
        assert monitor.steps == 3
    hist = monitor.history
    assert [r.step for r in hist] == [0, 1, 2]
    last = model[4]
    for k, rec in enumerate(hist):  # d((k+1) sum y)/dy = k+1 everywhere
        assert rec.outputs["4"].max_abs == pytest.approx(k + 1)
        _close(rec.params["4.bias"], _stats(torch.full_like(last.bias, (k + 1) * x.shape[0])))


def test_module_called_twice_aggregates_calls(device: torch.device) -> None:
    lin = nn.Linear(4, 4).double().to(device)
    model = nn.Sequential(lin, nn.Tanh(), lin).to(device)  # the same module twice
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    h1 = lin(x)
    h2 = lin(torch.tanh(h1))
    g1, g2 = torch.autograd.grad(h2.pow(2).sum(), (h1, h2))
    with GradientMonitor(model) as monitor:
        model(x).pow(2).sum().backward()
    rec = monitor.history[0]
    both = torch.cat([g1.flatten(), g2.flatten()])
    _close(rec.outputs["0"], _stats(both))  # norm of the concatenation over both calls


def _nan_net(device: torch.device) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 8),
        nn.ReLU(),
        NaNLayer(),  # "4": the planted bug
        nn.Linear(8, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 2),
    ).to(device)


def test_planted_nan_is_traced_to_its_layer(device: torch.device) -> None:
    model = _nan_net(device)
    model[4].armed = False
    x = torch.randn(4, 5, device=device)
    with GradientMonitor(model) as monitor:
        for step in range(4):
            model.zero_grad()
            model[4].armed = step == 2
            model(x).pow(2).mean().backward()
    assert monitor.first_nonfinite == "4"
    assert monitor.first_nonfinite_step == 2
    assert monitor.nonfinite_source == NonfiniteSource("4", 2, "backward")
    hist = monitor.history
    assert hist[0].source is None and hist[1].source is None and hist[3].source is None
    bad = hist[2]
    # the NaN shows up in every layer before it (later in backward order) ...
    for name in ("0", "1", "2", "3", "0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in bad.nonfinite
    # ... but neither the source's own output gradient nor anything after it is non-finite
    for name in ("4", "5", "6", "7", "5.weight", "7.bias"):
        assert name not in bad.nonfinite
    assert math.isnan(bad.outputs["3"].norm) and math.isfinite(bad.outputs["4"].norm)


class NaNInputGradLinear(nn.Linear):
    """A Linear whose backward makes NaN for the input gradient only (parameters finite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(NaNBackward.apply(x))


def test_nan_in_a_parametrised_layer(device: torch.device) -> None:
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), NaNInputGradLinear(6, 6), nn.Tanh(), nn.Linear(6, 1)
    ).to(device)
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 3, device=device)).sum().backward()
    assert monitor.first_nonfinite == "2"
    assert "2.weight" not in monitor.history[0].nonfinite


def test_nan_in_the_gradient_of_the_model_input(device: torch.device) -> None:
    # The first layer's input is no monitored module's output: it is hooked after the call
    # (Linear cannot run in place), and only that gradient turns NaN.
    model = nn.Sequential(NaNInputGradLinear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(device)
    x = torch.randn(2, 3, device=device, requires_grad=True)
    with GradientMonitor(model) as monitor:
        model(x).sum().backward()
    assert monitor.nonfinite_source == NonfiniteSource("0", 0, "backward")
    assert monitor.history[0].nonfinite == ()  # inputs have no statistics of their own
    assert x.grad is not None and x.grad.isnan().all()


def test_forward_nan_is_blamed_on_the_consumer(device: torch.device) -> None:
    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)  # NaN for negative entries, made in the forward pass

    model = nn.Sequential(nn.Linear(3, 4), Log(), nn.Linear(4, 1)).to(device)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 3, device=device)).sum().backward()
    # Linear "2" receives a finite output gradient and makes a NaN weight gradient
    assert monitor.first_nonfinite == "2"


def test_nan_from_the_loss_is_incoming(device: torch.device) -> None:
    model = mlp().to(device)
    with GradientMonitor(model) as monitor:
        y = model(input_for(model, device))
        (y * float("nan")).sum().backward()
    assert monitor.nonfinite_source == NonfiniteSource("4", 0, "incoming")


def test_no_nan_reports_none(device: torch.device) -> None:
    model = _nan_net(device)
    model[4].armed = False
    with GradientMonitor(model) as monitor:
        for _ in range(3):
            model(torch.randn(4, 5, device=device)).pow(2).mean().backward()
    assert monitor.first_nonfinite is None and monitor.first_nonfinite_step is None
    assert all(r.nonfinite == () and r.source is None for r in monitor.history)


def test_vanishing_flags(device: torch.device) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(8, 8), nn.Sigmoid()]
    model = nn.Sequential(*layers).double().to(device)
    with torch.no_grad():
        for m in model[::2]:
            m.weight.mul_(0.1)  # every sigmoid + small weight shrinks the gradient ~40x
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    with GradientMonitor(model, vanishing=1e-9) as monitor:
        model(x).sum().backward()
    rec = monitor.history[0]
    flagged = [n for n in rec.vanishing if n in rec.outputs]
    assert flagged and "0" in flagged and str(len(model) - 1) not in flagged
    assert all(rec.outputs[n].norm < 1e-9 for n in flagged)
    assert all(rec.outputs[n].norm >= 1e-9 for n in rec.outputs if n not in flagged)
    with GradientMonitor(model, vanishing=0.0) as monitor:  # adjustable: off
        model(x).sum().backward()
    assert monitor.history[0].vanishing == ()


def test_exploding_flags(device: torch.device) -> None:
    model = nn.Sequential(*[nn.Linear(6, 6, bias=False) for _ in range(6)]).double().to(device)
    with torch.no_grad():
        for m in model:
            m.weight.copy_(5 * torch.eye(6, dtype=torch.float64))  # x5 per layer
    x = torch.ones(1, 6, dtype=torch.float64, device=device)
    with GradientMonitor(model, exploding=100.0) as monitor:
        model(x).sum().backward()
    rec = monitor.history[0]
    norms = {n: s.norm for n, s in rec.outputs.items()}  # output grad of layer i: 5^(5-i) sqrt 6
    for i in range(6):
        assert norms[str(i)] == pytest.approx(5 ** (5 - i) * math.sqrt(6))
    assert set(rec.exploding) == {
        n for n, s in {**rec.outputs, **rec.params}.items() if s.norm > 100
    }
    assert {"0", "1", "2"} <= set(rec.exploding) and "5" not in rec.exploding
    assert rec.nonfinite == ()


def test_double_backward_gives_two_steps(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device).requires_grad_(True)
    with GradientMonitor(model) as monitor:
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
    hist = monitor.history
    assert len(hist) == 2
    assert hist[0].params == {}  # autograd.grad does not accumulate into .grad
    # the last bias does not change d y / d x, so the penalty's pass gives it no gradient
    assert set(hist[1].params) == {n for n, _ in model.named_parameters()} - {"4.bias"}


def test_hooks_removed_after_context_and_exception(device: torch.device) -> None:
    model = _nan_net(device)
    before = hook_counts(model)
    x = torch.randn(2, 5, device=device)
    with GradientMonitor(model) as monitor:
        assert hook_counts(model) != before
        model(x).sum().backward()
    assert hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"), GradientMonitor(model):
        y = model(x)
        raise RuntimeError("boom")
    assert hook_counts(model) == before
    assert not y._backward_hooks  # the tensor hooks of that forward are gone too
    y.sum().backward()
    assert monitor.steps == 1


def test_backward_that_raises_does_not_swallow_the_next_step(device: torch.device) -> None:
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            raise ValueError("backward failed")

    model = mlp().to(device)
    x = input_for(model, device).requires_grad_(True)
    with GradientMonitor(model) as monitor:
        with pytest.raises(ValueError, match="backward failed"):
            model(Boom.apply(x)).sum().backward()  # the model's hooks fire, then it raises
        model(x).sum().backward()
    assert monitor.steps == 2  # the failed pass is one step, the next one another
    hist = monitor.history
    assert set(hist[0].outputs) == set(hist[1].outputs) == {str(i) for i in range(5)}
    assert "0.weight" in hist[1].params


@pytest.mark.parametrize("diagnostics", [(), ("gsnr", "inner_product_test", "update_size")])
def test_nothing_kept_alive(device: torch.device, diagnostics) -> None:  # type: ignore[no-untyped-def]
    model = mlp().to(device)
    with GradientMonitor(model, diagnostics=diagnostics) as monitor:
        for _ in range(2):
            model(input_for(model, device)).sum().backward()
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    assert model_ref() is None
    mon_ref = weakref.ref(monitor)
    del monitor
    assert mon_ref() is None  # no cycle: refcounting frees it


def test_monitor_does_not_keep_model_alive_while_active(device: torch.device) -> None:
    model = mlp().to(device)
    monitor = GradientMonitor(model)
    monitor.__enter__()
    model(input_for(model, device)).sum().backward()
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    assert model_ref() is None
    monitor.__exit__(None, None, None)
    assert monitor.steps == 1


def test_selection_by_pattern(device: torch.device) -> None:
    model = mlp(depth=4).to(device)
    with GradientMonitor(model, "[02]", params=False) as monitor:
        model(input_for(model, device)).sum().backward()
    rec = monitor.history[0]
    assert list(rec.outputs) == ["0", "2"] and rec.params == {}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"vanishing must be below exploding=1\.0, got 10\.0"):
        GradientMonitor(mlp(), vanishing=10.0, exploding=1.0)
    with pytest.raises(ValueError, match="GradientMonitor: pattern 'dec' matches no module"):
        GradientMonitor(mlp(), "dec")
    with pytest.raises(TypeError, match=r"GradientMonitor: model must be a torch\.nn\.Module"):
        GradientMonitor("model")  # type: ignore[arg-type]
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises((ValueError, TypeError), match="GradientMonitor: history_size must"):
            GradientMonitor(mlp(), history_size=bad)  # type: ignore[arg-type]


class InplaceBetween(nn.Module):
    """An in-place op outside any module, between two modules, whose backward makes Inf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.Hardtanh()  # saves its input, not its output: sqrt_ below is allowed
        self.fc2 = nn.Linear(4, 1)
        with torch.no_grad():
            self.fc1.weight.zero_()  # act outputs zeros: d sqrt(h) / dh = Inf there
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h.sqrt_()
        return self.fc2(h)


def test_inplace_op_between_modules_is_not_blamed_on_the_consumer(device: torch.device) -> None:
    model = InplaceBetween().to(device)
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 3, device=device)).sum().backward()
    # fc2 received the modified tensor: its input gradient is finite, it is not the source.
    # The Inf was made by sqrt_ (no module) and arrived at act's output: "incoming" there.
    assert monitor.nonfinite_source == NonfiniteSource("act", 0, "incoming")
    assert "act" in monitor.history[0].nonfinite and "fc2" not in monitor.history[0].nonfinite


@pytest.fixture(
    params=["blas", "grouped", "grouped-flushes", "alone", "fused", "fused-small-buffer"]
)
def stats_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """Run a test through every statistics path and return the buffer_bytes to use.

    CPU: "blas" (three BLAS level-1 calls per gradient in its hook, the default where SciPy is
    installed; float16/bfloat16 and non-contiguous gradients take the torch paths below). The
    torch paths, SciPy hidden: "grouped" (|g| rows reduced per size group when the pass ends),
    "grouped-flushes" (a 2000-byte buffer: flushes during the pass, rows buffers that grow, and
    gradients too large to buffer), "alone" (a 1-byte buffer: every gradient reduced on its own
    in its hook). The CUDA path (references kept, fused _foreach_norm), which otherwise only runs
    on a GPU: with the default buffer and with a 1-byte buffer (a reduction per gradient).
    """
    if request.param == "blas":
        if not _stats_module._BLAS:
            pytest.skip("SciPy is not installed (the `fast` extra)")
    else:
        monkeypatch.setattr(_stats_module, "_BLAS", {})
    if request.param.startswith("fused"):
        monkeypatch.setattr("gradlab.hooks._buffer._GROUPED_DEVICES", ())
    return {"grouped-flushes": 2000, "alone": 1, "fused-small-buffer": 1}.get(request.param)


def test_both_statistics_paths_match_references(
    stats_path: int | None, device: torch.device
) -> None:
    model = cnn(inplace=True).to(device)
    x = input_for(model, device)
    ref_out, _ = reference_grads(model, x)
    with GradientMonitor(model, buffer_bytes=stats_path) as monitor:
        model(x).pow(2).sum().backward()
    rec = monitor.history[0]
    for i, ref in enumerate(ref_out):
        _close(rec.outputs[str(i)], _stats(ref))
    for n, p in model.named_parameters():
        _close(rec.params[n], _stats(p.grad))


def test_large_and_small_cpu_gradients_mix(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without SciPy, gradients over 64 KiB are reduced alone in their hook, smaller ones in
    # rows: one step with both (the 64 x 300 float64 outputs are 150 KiB; biases etc. small).
    monkeypatch.setattr(_stats_module, "_BLAS", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 3)).double().to(device)
    x = torch.randn(64, 20, dtype=torch.float64, device=device)
    ref_out, _ = reference_grads(model, x)
    with GradientMonitor(model) as monitor:
        model(x).pow(2).sum().backward()
    rec = monitor.history[0]
    for i, ref in enumerate(ref_out):
        _close(rec.outputs[str(i)], _stats(ref))
    for n, p in model.named_parameters():
        _close(rec.params[n], _stats(p.grad))


def test_both_statistics_paths_trace_nan(stats_path: int | None, device: torch.device) -> None:
    model = _nan_net(device)
    with GradientMonitor(model, buffer_bytes=stats_path) as monitor:
        model(torch.randn(4, 5, device=device)).pow(2).mean().backward()
    assert monitor.nonfinite_source == NonfiniteSource("4", 0, "backward")
    assert "0.weight" in monitor.history[0].nonfinite


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_do_not_overflow(
    dtype: torch.dtype, stats_path: int | None, device: torch.device
) -> None:
    model = nn.Sequential(Scale(), Scale())
    x = torch.ones(100, 100, dtype=dtype, device=device, requires_grad=True)
    with GradientMonitor(model, buffer_bytes=stats_path) as monitor:
        (model(x) * 64).sum().backward()  # d/d out = 64 on 10^4 entries: L1 = 640000 > 65504
    rec = monitor.history[0]
    assert rec.outputs["1"] == LayerStats(6400.0, 64.0, 64.0)
    assert rec.outputs["0"] == LayerStats(12800.0, 128.0, 128.0)
    assert rec.nonfinite == () and rec.exploding == ("0", "1")


def test_empty_batch(stats_path: int | None, device: torch.device) -> None:
    model = mlp().to(device)
    with GradientMonitor(model, buffer_bytes=stats_path) as monitor:
        model(torch.randn(0, 5, dtype=torch.float64, device=device)).sum().backward()
    rec = monitor.history[0]
    assert rec.outputs["4"] == LayerStats(0.0, 0.0, 0.0)  # empty gradients: zeros, no crash
    assert rec.params["4.bias"] == LayerStats(0.0, 0.0, 0.0)  # d sum / d b over 0 rows
    assert monitor.first_nonfinite is None


def test_params_are_those_this_pass_accumulated(device: torch.device) -> None:
    # Parameter gradients are read when the pass ends: a parameter counts only when this pass
    # accumulates into its .grad, even though earlier passes left a .grad on every parameter.
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(device).double()
    x = torch.randn(2, 3, device=device, dtype=torch.float64)
    with GradientMonitor(model) as monitor:
        model(x).sum().backward()
        torch.autograd.grad(model(x).sum(), list(model.parameters()))
        model[2](model[1](model[0](x)).detach()).sum().backward()
        model(x).sum().backward(inputs=[model[0].bias])
    hist = monitor.history
    assert [list(h.params) for h in hist] == [
        ["0.weight", "0.bias", "2.weight", "2.bias"],
        [],
        ["2.weight", "2.bias"],
        ["0.bias"],
    ]
    # the recorded value is the accumulated .grad after the pass (no zero_grad in between)
    assert model[0].bias.grad is not None
    _close(hist[3].params["0.bias"], _stats(model[0].bias.grad))


def test_parameter_nan_is_blamed_before_a_later_input_nan(device: torch.device) -> None:
    # Layer "4" makes a NaN weight gradient only (its input holds a NaN made in forward by
    # Log "3"); Log's backward then turns the finite gradient into NaN as well. In backward
    # order "4" comes first, although its parameter gradients are read when the pass ends.
    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), Log(), nn.Linear(4, 1)).to(
        device
    )
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 3, device=device)).sum().backward()
    assert monitor.nonfinite_source == NonfiniteSource("4", 0, "backward")


def _run_steps(monitor: GradientMonitor, model: nn.Module, xs: list[torch.Tensor]) -> None:
    with monitor:
        for x in xs:
            model.zero_grad()
            model(x).pow(2).sum().backward()


def test_history_is_a_read_only_sequence_that_grows(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device)
    with GradientMonitor(model) as monitor:
        model(x).sum().backward()
        hist = monitor.history
        assert len(hist) == 1
        model(x).sum().backward()
        assert len(monitor.history) == 2 and len(hist) == 2  # live view, updated on access
    assert [r.step for r in hist] == [0, 1]
    assert hist[-1].step == 1 and [r.step for r in hist[::-1]] == [1, 0]
    assert hist[0] == hist[0]  # rebuilt on each read, equal every time
    with pytest.raises(IndexError):
        hist[2]
    with pytest.raises(TypeError):
        hist[0] = hist[1]  # type: ignore[index]


def test_history_size_keeps_the_last_steps(device: torch.device) -> None:
    torch.manual_seed(0)
    model = mlp().to(device)
    xs = [input_for(model, device) for _ in range(7)]
    full, last3 = GradientMonitor(model), GradientMonitor(model, history_size=3)
    _run_steps(full, model, xs)
    _run_steps(last3, model, xs)
    assert len(full.history) == 7 and len(last3.history) == 3
    assert [r.step for r in last3.history] == [4, 5, 6]
    assert list(last3.history) == list(full.history)[4:]  # same statistics, same steps


def test_history_size_keeps_the_nan_source(device: torch.device) -> None:
    model = nn.Sequential(nn.Linear(5, 4), NaNLayer(), nn.Linear(4, 1)).to(device)
    x = torch.randn(3, 5, device=device)
    with GradientMonitor(model, history_size=1) as monitor:
        for step in range(4):
            model[1].armed = step == 1
            model.zero_grad()
            model(x).sum().backward()
    assert monitor.nonfinite_source == NonfiniteSource("1", 1, "backward")
    assert [r.step for r in monitor.history] == [3]


def test_every_nonfinite_step_has_its_source_and_finite_steps_none(device: torch.device) -> None:
    model = nn.Sequential(nn.Linear(5, 4), NaNLayer(), nn.Linear(4, 1)).to(device)
    x = torch.randn(3, 5, device=device)
    with GradientMonitor(model) as monitor:
        for armed in (False, True, False, True):
            model[1].armed = armed
            model.zero_grad()  # else the NaN stays in the accumulated .grad of layer 0
            model(x).sum().backward()
    sources = [r.source for r in monitor.history]
    assert sources[0] is None and sources[2] is None
    assert sources[1] == NonfiniteSource("1", 1, "backward")
    assert sources[3] == NonfiniteSource("1", 3, "backward")
    assert [r.nonfinite != () for r in monitor.history] == [False, True, False, True]
    assert monitor.first_nonfinite_step == 1


def test_history_memory_per_step_is_small() -> None:
    # Finite steps are stored as one float64 array per step plus a layout shared by the steps
    # of the same structure: measured ~32 B per recorded gradient plus ~200 B per step. Dead
    # hook handles are pruned every few steps: 1200 steps average that sawtooth out.
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    with GradientMonitor(model, history_size=None) as monitor:
        # Warm up past Python's tuple free list (2000 per size), which tracemalloc would count.
        for _ in range(2100):
            model.zero_grad()
            model(x).sum().backward()
            _ = monitor.first_nonfinite
        last = monitor.history[-1]
        records = len(last.outputs) + len(last.params)  # one call each, one output each
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(1200):
                model.zero_grad()
                model(x).sum().backward()
                _ = monitor.first_nonfinite  # read every step: the records are built
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    per_step = grown / 1200
    assert per_step < 32 * records + 400, (per_step, records)


def test_enter_rolls_back_when_a_module_is_gone_and_refuses_reentry() -> None:
    model = mlp()
    before = hook_counts(model)
    monitor = GradientMonitor(model)
    model[4] = nn.Linear(8, 3).double()  # the monitored layer "4" no longer exists
    gc.collect()
    with pytest.raises(RuntimeError, match="GradientMonitor: '4' no longer exists"):
        monitor.__enter__()
    assert hook_counts(model) == before  # the hooks put on layers 0-3 were removed again
    fresh = GradientMonitor(model)
    with fresh:
        with pytest.raises(RuntimeError, match="GradientMonitor: this context is already active"):
            fresh.__enter__()
        model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    assert fresh.steps == 1 and hook_counts(model) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"vanishing": None}, TypeError, "vanishing must be a finite number >= 0, got None"),
        ({"exploding": "big"}, TypeError, "exploding must be a number > 0, got 'big'"),
        ({"vanishing": -1.0}, ValueError, "vanishing must be a finite number >= 0, got -1.0"),
        ({"vanishing": math.nan}, ValueError, "vanishing must be a finite number >= 0, got nan"),
        ({"buffer_bytes": "4MB"}, TypeError, "buffer_bytes must be an int >= 0, got '4MB'"),
        ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"params": "yes"}, TypeError, "params must be True or False, got 'yes'"),
        ({"trace_nonfinite": 1}, TypeError, "trace_nonfinite must be True or False, got 1"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_inputs_name_the_argument_and_the_fix(kwargs, error, text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=f"^GradientMonitor: {re.escape(text)}\\. [A-Z]"):
        GradientMonitor(mlp(), **kwargs)


def test_scalars_step_must_be_an_int() -> None:
    model = mlp()
    with GradientMonitor(model) as monitor:
        model(input_for(model, torch.device("cpu"))).sum().backward()
    with pytest.raises(TypeError, match=r"scalars: step must be an int, got 'last'\. An index"):
        monitor.scalars(step="last")  # type: ignore[arg-type]


def _state(model: nn.Module, *patterns: str, **kw: bool) -> dict:  # type: ignore[type-arg]
    monitor = GradientMonitor(model, *patterns, **kw)
    with monitor:
        model(input_for(model, torch.device("cpu"))).sum().backward()
    return monitor.state_dict()


def test_state_of_another_model_is_refused_with_both_lists() -> None:
    a, b = mlp(depth=3), mlp(depth=4)
    state = _state(b)
    with pytest.raises(ValueError, match=r"other modules.*'6'.*this monitor records \['0'"):
        GradientMonitor(a).load_state_dict(state)
    with pytest.raises(ValueError, match=r"patterns \['\[02\]'\].*patterns \[\]"):
        GradientMonitor(a).load_state_dict(_state(a, "[02]"))
    with pytest.raises(ValueError, match="recorded on other modules"):
        GradientMonitor(a, params=False).load_state_dict(_state(a))
    GradientMonitor(a).load_state_dict(_state(mlp(depth=3)))  # same structure: accepted


def test_version_1_state_of_another_model_is_refused() -> None:
    a, b = mlp(depth=3), mlp(depth=4)
    state = _state(b)
    state["version"] = 1
    for key in ("names", "patterns", "diagnostics", "theta0"):
        del state[key]
    with pytest.raises(ValueError, match="recorded on other modules"):
        GradientMonitor(a).load_state_dict(state)
    GradientMonitor(b).load_state_dict(state)
