"""capture_grads against torch.autograd.grad / retain_grad references."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor, capture_grads
from tests.hooks._helpers import (
    cnn,
    global_snapshot,
    global_tables,
    hook_counts,
    input_for,
    mlp,
    non_inplace_twin,
    reference_grads,
    run_layers,
)

MODELS = {
    "mlp": lambda: mlp(inplace=False),
    "mlp-inplace-relu": lambda: mlp(inplace=True),
    "cnn-inplace-relu": lambda: cnn(inplace=True),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_output_grads_match_autograd_grad(kind: str, device: torch.device) -> None:
    model = MODELS[kind]().to(device)
    x = input_for(model, device)
    ref_out, _ = reference_grads(model, x)
    with capture_grads(model) as grads:
        model(x).pow(2).sum().backward()
    assert list(grads) == [str(i) for i in range(len(model))]
    for i, ref in enumerate(ref_out):
        torch.testing.assert_close(grads[str(i)], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(MODELS))
def test_input_grads_match_autograd_grad(kind: str, device: torch.device) -> None:
    model = MODELS[kind]().to(device)
    x = input_for(model, device).requires_grad_(True)
    _, ref_in = reference_grads(model, x)
    with capture_grads(model, of="input") as grads:
        model(x).pow(2).sum().backward()
    assert len(grads) == len(model)
    for i, ref in enumerate(ref_in):
        # for an in-place ReLU this is the gradient w.r.t. the value it received (pre-activation)
        torch.testing.assert_close(grads[str(i)], ref, rtol=1e-12, atol=1e-12)


def test_first_input_without_grad_has_no_entry(device: torch.device) -> None:
    model = mlp().to(device)
    with capture_grads(model, of="input") as grads:
        model(input_for(model, device)).sum().backward()
    assert "0" not in grads and "1" in grads
    with pytest.raises(KeyError, match="no gradient for '0'"):
        grads["0"]


def test_outputs_match_retain_grad(device: torch.device) -> None:
    model = mlp(depth=4).to(device)
    x = input_for(model, device)
    kept = []

    def keep(m: nn.Module, a: object, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    handles = [m.register_forward_hook(keep) for m in model]
    model(x).sum().backward()
    for h in handles:
        h.remove()
    with capture_grads(model) as grads:
        model(x).sum().backward()
    for i, out in enumerate(kept):
        torch.testing.assert_close(grads[str(i)], out.grad, rtol=0, atol=0)


class Twice(nn.Module):
    """A shared Linear applied twice in one forward (like an RNN cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.act(self.lin(x)))


def test_module_called_twice_keeps_every_call(device: torch.device) -> None:
    model = Twice().double().to(device)
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    h1 = model.lin(x)
    h2 = model.lin(model.act(h1))
    ref1, ref2 = torch.autograd.grad(h2.pow(3).sum(), (h1, h2))
    with capture_grads(model, "lin") as grads:
        model(x).pow(3).sum().backward()
    calls = grads.calls("lin")
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], ref1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(calls[1], ref2, rtol=1e-12, atol=1e-12)
    assert grads["lin"] is calls[1]  # the last call in forward order
    assert not torch.allclose(calls[0], calls[1])


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
        self.block2 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


def test_glob_selection(device: torch.device) -> None:
    model = Nested().double().to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    h1 = model.block1(x)
    h = model.block2[0](h1)
    out = model.block2[2](model.block2[1](h))
    ref_h1, ref_h = torch.autograd.grad(out.square().sum(), (h1, h))
    with capture_grads(model, "block2.0", "block1") as grads:
        model(x).square().sum().backward()
    assert sorted(grads) == ["block1", "block2.0"]  # a container selects its own output
    torch.testing.assert_close(grads["block1"], ref_h1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["block2.0"], ref_h, rtol=1e-12, atol=1e-12)
    with capture_grads(model, "*.2") as grads:
        model(x).square().sum().backward()
    assert sorted(grads) == ["block1.2", "block2.2"]


def test_create_graph_double_backward(device: torch.device) -> None:
    model = mlp(inplace=True).to(device)
    x = input_for(model, device).requires_grad_(True)
    # references on an out-of-place twin: the first pass and the penalty's pass
    twin = non_inplace_twin(model)
    xr = x.detach().requires_grad_(True)
    out, inputs = run_layers(twin, xr)
    outs = [*inputs[1:], out]
    (gx,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
    first = torch.autograd.grad(out.sum(), outs, retain_graph=True)
    second = torch.autograd.grad(gx.pow(2).sum(), outs, allow_unused=True)

    with capture_grads(model) as grads:
        y = model(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert grads.backward_passes == 1
        for i, ref in enumerate(first):
            torch.testing.assert_close(grads[str(i)], ref, rtol=1e-12, atol=1e-12)
        penalty = g.pow(2).sum()
        penalty.backward()  # the hooks fire again: the last pass wins
    assert grads.backward_passes == 2
    for i, ref in enumerate(second):
        if ref is None:
            assert str(i) not in grads
            continue
        torch.testing.assert_close(grads[str(i)], ref, rtol=1e-10, atol=1e-12)
        assert not grads[str(i)].requires_grad and grads[str(i)].grad_fn is None


def test_last_backward_wins(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device)
    with capture_grads(model) as grads:
        y = model(x)
        y.backward(torch.ones_like(y), retain_graph=True)
        first = grads["4"].clone()
        y.backward(3 * torch.ones_like(y), retain_graph=True)
        torch.testing.assert_close(grads["4"], 3 * first)  # replaced, not accumulated
        # a pass that only reaches the first layers clears the rest
        h = model[0](x)
        model[1](h).sum().backward()
    assert grads.backward_passes == 3
    assert sorted(grads) == ["0", "1"]


def test_parameter_grads_snapshot(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device)
    with capture_grads(model, of="parameter") as grads:
        model(x).sum().backward()
        after_first = {n: p.grad.clone() for n, p in model.named_parameters()}
        model(x).sum().backward()  # accumulates into .grad
    assert list(grads) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)
        torch.testing.assert_close(grads[n], 2 * after_first[n])
    model.zero_grad(set_to_none=False)  # the snapshot does not change with .grad
    assert all(grads[n].abs().sum() > 0 for n in grads)
    with capture_grads(model, "2", of="parameter") as grads:
        model(x).sum().backward()
    assert sorted(grads) == ["2.bias", "2.weight"]


def test_multi_output_module_keys(device: torch.device) -> None:
    lstm = nn.LSTM(3, 4, batch_first=True).double().to(device)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    out, (h, _) = lstm(x)
    ref = torch.autograd.grad(out.sum() + h.pow(2).sum(), (out, h))
    with capture_grads(lstm) as grads:
        out, (h, _) = lstm(x)
        (out.sum() + h.pow(2).sum()).backward()
    assert sorted(grads) == ["[0]", "[1]"]  # the model itself is the leaf: name ""
    torch.testing.assert_close(grads["[0]"], ref[0])
    torch.testing.assert_close(grads["[1]"], ref[1])
    with pytest.raises(KeyError, match="several tensors"):
        grads[""]


def test_hooks_removed_after_context_and_exception(device: torch.device) -> None:
    model = cnn(inplace=True).to(device)
    before = hook_counts(model)
    x = input_for(model, device)
    for of in ("output", "input", "parameter"):
        with capture_grads(model, of=of) as grads:  # type: ignore[arg-type]
            assert hook_counts(model) != before
            y = model(x)
        assert hook_counts(model) == before
        y.sum().backward()  # the gradient hooks of that forward are gone too
        assert grads.backward_passes == 0 and len(grads) == 0
        with pytest.raises(RuntimeError, match="boom"), capture_grads(model, of=of):  # type: ignore[arg-type]
            model(x)
            raise RuntimeError("boom")
        assert hook_counts(model) == before


def test_tensor_hooks_removed_on_exit(device: torch.device) -> None:
    model = mlp().to(device)
    with capture_grads(model) as grads:
        y = model(input_for(model, device))
    y.sum().backward()  # the forward ran inside, the backward after: nothing is recorded
    assert len(grads) == 0 and grads.backward_passes == 0


def test_nothing_kept_alive(device: torch.device) -> None:
    model = mlp().to(device)
    x = input_for(model, device)
    with capture_grads(model) as grads:
        model(x).sum().backward()
    model_ref = weakref.ref(model)
    grad_ref = weakref.ref(grads["2"])
    grads_ref = weakref.ref(grads)
    del model
    gc.collect()
    assert model_ref() is None  # the result does not keep the model alive
    del grads
    gc.collect()
    assert grads_ref() is None and grad_ref() is None


def test_container_collected_while_model_lives(device: torch.device) -> None:
    model = mlp().to(device)
    with capture_grads(model) as grads:
        model(input_for(model, device)).sum().backward()
    ref = weakref.ref(grads)
    del grads
    assert ref() is None  # no reference cycle: freed by refcounting alone, without gc


def test_bad_arguments() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"capture_grads: pattern 'enc\*' matches no module.*'0'"):
        capture_grads(model, "enc*")
    with pytest.raises(TypeError, match="capture_grads: patterns must be module-name glob"):
        capture_grads(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capture_grads: of must be one of"):
        capture_grads(model, of="outputs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"capture_grads: model must be a torch\.nn\.Module"):
        capture_grads(lambda x: x)  # type: ignore[arg-type]


class Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x * 1.0).chunk(2, dim=1)  # two outputs of one autograd node


def test_outputs_of_one_node_and_leaf_outputs(device: torch.device) -> None:
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    model = nn.Sequential(nn.Identity(), Halves())
    with capture_grads(model) as grads:
        a, b = model(x)
        (a.pow(2).sum() + 0 * b.sum()).backward()
    # "0": nn.Identity returns the leaf x itself (a tensor hook on a leaf); "1": two outputs of
    # one SplitBackward node, each keyed by position.
    torch.testing.assert_close(grads["1[0]"], 2 * a.detach())
    torch.testing.assert_close(grads["1[1]"], torch.zeros_like(b))
    torch.testing.assert_close(grads["0"], torch.cat([2 * a.detach(), torch.zeros_like(b)], 1))
    with capture_grads(model) as grads:
        a, _ = model(x)
        a.sum().backward()  # b's gradient is undefined: no entry, as with tensor hooks
    assert sorted(grads) == ["0", "1[0]"]


def test_other_models_and_nested_contexts(device: torch.device) -> None:
    model, other = mlp().to(device), mlp().to(device)
    x = input_for(model, device)
    ref, _ = reference_grads(model, x)
    with capture_grads(model) as outer, capture_grads(model, "2") as inner:
        other(x).pow(2).sum().backward()  # another model in the process: not recorded
        assert len(outer) == 0 and outer.backward_passes == 0
        model(x).pow(2).sum().backward()
    assert sorted(inner) == ["2"]
    for i, g in enumerate(ref):
        torch.testing.assert_close(outer[str(i)], g)
    torch.testing.assert_close(inner["2"], ref[2])


def test_output_is_the_modules_own_before_user_hooks(device: torch.device) -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double().to(device)
    handle = model[0].register_forward_hook(lambda m, a, out: 3 * out)  # replaces the output
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    try:
        with capture_grads(model) as grads:
            model(x).sum().backward()
    finally:
        handle.remove()
    # d(sum(3 y))/dy = 3 for the module's own output y (the documented choice).
    torch.testing.assert_close(grads["0"], torch.full((4, 2), 3.0, **_like(x)))


def _like(t: torch.Tensor) -> dict[str, object]:
    return {"dtype": t.dtype, "device": t.device}


def test_enter_rolls_back_when_a_module_is_gone_and_refuses_reentry() -> None:
    model = mlp()
    before = hook_counts(model)
    grads = capture_grads(model, of="input")
    model[4] = nn.Linear(8, 3).double()
    gc.collect()
    with pytest.raises(RuntimeError, match="capture_grads: '4' no longer exists"):
        grads.__enter__()
    assert hook_counts(model) == before
    fresh = capture_grads(model)
    with fresh:
        with pytest.raises(RuntimeError, match="capture_grads: this context is already active"):
            fresh.__enter__()
        model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    assert sorted(fresh) == [str(i) for i in range(5)] and hook_counts(model) == before


def test_thousand_contexts_leave_every_global_hook_table_unchanged() -> None:
    # Each of_="output" context registers one process-wide forward hook (with kwargs); torch's
    # handle used to leave its entry in _global_forward_hooks_with_kwargs behind.
    model = mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    tables = global_tables()
    assert "_global_forward_hooks_with_kwargs" in tables and "_global_backward_hooks" in tables
    before = global_snapshot()
    for i in range(1000):
        with capture_grads(model, of=("output", "input", "parameter")[i % 3]) as grads:
            if i % 100 == 0:
                model(x).sum().backward()
        if i % 100 == 0:
            assert len(grads) > 0
    assert global_snapshot() == before


def test_nested_raising_and_threaded_contexts_restore_the_global_tables() -> None:
    model, other = mlp(), mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    before = global_snapshot()
    with capture_grads(model) as outer:
        with pytest.raises(ZeroDivisionError):
            with capture_grads(model, "0"), GradientMonitor(other):
                inner_tables = global_snapshot()
                assert inner_tables != before  # the contexts are in
                other(x).sum().backward()
                1 / 0  # noqa: B018
        model(x).sum().backward()
    assert set(outer) == {"0", "1", "2", "3", "4"}
    assert global_snapshot() == before

    errors: list[BaseException] = []

    def work() -> None:
        try:
            net = mlp()
            for _ in range(100):
                with capture_grads(net) as grads:
                    net(x).sum().backward()
                assert len(grads) == 5
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert global_snapshot() == before


def test_a_per_sample_replay_inside_the_capture_is_not_captured() -> None:
    """PerSampleGradients replays a module without a closed form (an eval-mode BatchNorm) with
    torch.func on single samples when its statistics are finished; the capture keeps the
    user's own forward and backward, exactly as without the engine."""
    from gradlab.per_sample import PerSampleGradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    model(torch.randn(8, 5, dtype=torch.float64))  # running statistics
    model.eval()
    x = torch.randn(8, 5, dtype=torch.float64)
    with capture_grads(model) as plain:
        model(x).square().mean().backward()
    with capture_grads(model) as grads:
        with PerSampleGradients(model) as ps:
            model(x).square().mean().backward()
        assert ps.norm.shape == (8,)  # finished (and replayed) inside the capture
    assert sorted(grads) == sorted(plain) == ["0", "1", "2"]
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=0)
