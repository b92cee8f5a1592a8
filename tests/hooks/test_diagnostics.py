"""GradientMonitor diagnostics without per-sample gradients: update_size and distance.

References: the parameters copied by hand at every backward (theta_t) and after every optimizer
step, and the formulas ||theta_after_t - theta_t|| and ||theta_t - theta_0|| written out.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor
from tests.hooks._helpers import cnn, input_for, mlp

_TOL = 1e-10  # float64: the same subtractions and sums, in another order


def _flat(model: nn.Module, module: str | None = None) -> torch.Tensor:
    ps = [
        p.detach().reshape(-1)
        for n, p in model.named_parameters()
        if module is None or n.rpartition(".")[0] == module
    ]
    return torch.cat(ps).clone()


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _owners(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters()))


def _snap(model: nn.Module) -> dict[str | None, torch.Tensor]:
    return {m: _flat(model, m) for m in [*_owners(model), None]}


def _run(model: nn.Sequential, opt_kind: str, device: torch.device, steps: int = 4, **kw):  # type: ignore[no-untyped-def]
    opt = _optimizer(opt_kind, model)
    before, after = [], []
    with GradientMonitor(model, diagnostics=("update_size", "distance"), **kw) as monitor:
        for _ in range(steps):
            opt.zero_grad()
            model(input_for(model, device)).pow(2).mean().backward()
            before.append(_snap(model))
            opt.step()
            after.append(_snap(model))
    return monitor, before, after


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("factory", [mlp, cnn], ids=["mlp", "cnn"])
def test_update_size_and_distance_match_the_formula(factory, opt_kind, device) -> None:  # type: ignore[no-untyped-def]
    model = factory().to(device)
    monitor, before, after = _run(model, opt_kind, device)
    history = monitor.history
    assert len(history) == 4
    modules = _owners(model)
    for t, rec in enumerate(history):
        update = torch.linalg.vector_norm(after[t][None] - before[t][None]).item()
        dist = torch.linalg.vector_norm(before[t][None] - before[0][None]).item()
        assert rec.diagnostics["update_size"] == pytest.approx(update, rel=_TOL, abs=_TOL)
        assert rec.diagnostics["distance"] == pytest.approx(dist, rel=_TOL, abs=_TOL)
        assert update > 0
        for m in modules:
            u = torch.linalg.vector_norm(after[t][m] - before[t][m]).item()
            d = torch.linalg.vector_norm(before[t][m] - before[0][m]).item()
            assert rec.diagnostics_by_module["update_size"][m] == pytest.approx(u, rel=_TOL)
            assert rec.diagnostics_by_module["distance"][m] == pytest.approx(d, rel=_TOL, abs=_TOL)


def test_update_size_is_readable_right_after_the_optimizer_step() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with GradientMonitor(model, diagnostics=("update_size",)) as monitor:
        model(input_for(model, torch.device("cpu"))).sum().backward()
        assert math.isnan(monitor.history[-1].diagnostics["update_size"])  # no step yet
        theta = _flat(model)
        opt.step()
        expected = torch.linalg.vector_norm(_flat(model) - theta).item()
        assert monitor.history[-1].diagnostics["update_size"] == pytest.approx(expected, rel=_TOL)


def test_update_without_optimizer_is_measured_at_the_next_backward() -> None:
    model = mlp()
    x = input_for(model, torch.device("cpu"))
    with GradientMonitor(model, diagnostics=("update_size",)) as monitor:
        model(x).sum().backward()
        theta = _flat(model)
        with torch.no_grad():  # a hand-written SGD step: no optimizer hook fires
            for p in model.parameters():
                p -= 0.1 * p.grad
        model(x).sum().backward()
    expected = torch.linalg.vector_norm(_flat(model) - theta).item()
    assert monitor.history[0].diagnostics["update_size"] == pytest.approx(expected, rel=_TOL)
    assert monitor.history[1].diagnostics["update_size"] == 0.0  # nothing moved after it


def test_every_k_computes_only_on_those_steps() -> None:
    model = mlp()
    monitor, before, after = _run(model, "sgd", torch.device("cpu"), steps=5, every=2)
    history = monitor.history
    assert [bool(r.diagnostics) for r in history] == [True, False, True, False, True]
    for t in (0, 2, 4):
        update = torch.linalg.vector_norm(after[t][None] - before[t][None]).item()
        assert history[t].diagnostics["update_size"] == pytest.approx(update, rel=_TOL)
    assert "diagnostics/update_size" in monitor.scalars(step=2)
    assert not any(k.startswith("diagnostics/") for k in monitor.scalars(step=1))


def test_scalars_keys_and_state_dict_round_trip() -> None:
    model = mlp()
    monitor, before, _ = _run(model, "adam", torch.device("cpu"), steps=3)
    logs = monitor.scalars()
    rec = monitor.history[-1]
    assert logs["diagnostics/update_size"] == rec.diagnostics["update_size"]
    assert logs["diagnostics/distance/2"] == rec.diagnostics_by_module["distance"]["2"]
    assert {k for k in logs if k.startswith("diagnostics/")} == {
        f"diagnostics/{n}{m}" for n in ("update_size", "distance") for m in ("", "/0", "/2", "/4")
    }
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    resumed = GradientMonitor(model, diagnostics=("update_size", "distance"))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [r.diagnostics for r in resumed.history] == [r.diagnostics for r in monitor.history]
    assert resumed.scalars() == logs
    # the run goes on from theta_0 of the first run
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with resumed:
        model(input_for(model, torch.device("cpu"))).sum().backward()
        theta = _flat(model)
        opt.step()
    expected = torch.linalg.vector_norm(theta - before[0][None]).item()
    assert resumed.history[-1].step == 3
    assert resumed.history[-1].diagnostics["distance"] == pytest.approx(expected, rel=_TOL)


def test_unknown_diagnostic_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown name, got 'noise'.*'update_size', 'distance'"):
        GradientMonitor(mlp(), diagnostics=("noise",))
    with pytest.raises(TypeError, match=r"diagnostics must be a tuple of names, got 'distance'"):
        GradientMonitor(mlp(), diagnostics="distance")  # type: ignore[arg-type]
    for bad in (0, -1, 1.5):
        with pytest.raises(
            (ValueError, TypeError), match="GradientMonitor: every must be an int >= 1"
        ):
            GradientMonitor(mlp(), every=bad)  # type: ignore[arg-type]


def test_plain_monitor_records_no_diagnostics() -> None:
    model = mlp()
    with GradientMonitor(model) as monitor:
        model(input_for(model, torch.device("cpu"))).sum().backward()
    assert monitor.history[0].diagnostics == {}
    assert not any(k.startswith("diagnostics/") for k in monitor.scalars())


def test_no_global_optimizer_hook_left_behind() -> None:
    from torch.optim import optimizer as optim_module

    before = dict(optim_module._global_optimizer_post_hooks)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with GradientMonitor(model, diagnostics=("update_size",)):
            assert len(optim_module._global_optimizer_post_hooks) == len(before) + 1
            model(input_for(model, torch.device("cpu"))).sum().backward()
            opt.step()
            raise RuntimeError("boom")
    assert dict(optim_module._global_optimizer_post_hooks) == before


@pytest.mark.parametrize("blas", [True, False], ids=["blas", "torch"])
@pytest.mark.parametrize("inside", ["none", "in_place", "data_swap"])
@pytest.mark.parametrize("by_hand", ["no_grad", "data"])
def test_steps_by_hand_and_changes_inside_the_pass(
    monkeypatch, by_hand, inside, blas, device
) -> None:  # type: ignore[no-untyped-def]
    """A loop that steps by hand (no optimizer hook): each backward's first hook measures the
    last update and refreshes the snapshot and the distance in the same loop, and the pass's end
    skips them if nothing changed since. The hand step through ``p.data`` (no version bump) and
    a parameter changed inside the pass after that refresh (in place, or its ``.data``
    replaced) must still give the formulas: update_t = ||theta_{t+1} - theta_t||, distance_t =
    ||theta_t - theta_0||, theta_t the parameters at the end of backward t. Without BLAS (no
    SciPy, or CUDA): the same by torch ops."""
    import gradlab.hooks._stats as stats

    if not blas:
        monkeypatch.setattr(stats, "_BLAS", {})
    model = mlp().to(device)
    x = input_for(model, device)
    ends, starts = [], []
    with GradientMonitor(model, diagnostics=("update_size", "distance")) as monitor:
        for step in range(5):
            handle = None
            if inside != "none" and step in (2, 3):
                # on layer 0's output: reached after the monitor's first hook of the pass

                def change(g: torch.Tensor) -> None:
                    with torch.no_grad():
                        w = model[-1].weight  # its backward has run: not needed any more
                        if inside == "in_place":
                            w.mul_(1.5)
                        else:
                            w.data = w.data * 1.5

                def hook(module: nn.Module, args: object, h: torch.Tensor) -> None:
                    h.register_hook(change)

                handle = model[1].register_forward_hook(hook)
            out = model(x)
            if handle is not None:
                handle.remove()
            starts.append(_snap(model))
            out.pow(2).mean().backward()
            ends.append(_snap(model))
            for p in model.parameters():
                if by_hand == "data":
                    p.data -= 0.1 * p.grad
                else:
                    with torch.no_grad():
                        p -= 0.1 * p.grad
            model.zero_grad()
    history = monitor.history
    for t, rec in enumerate(history):
        nxt = starts[t + 1] if t + 1 < len(starts) else _snap(model)
        for m in [*_owners(model), None]:
            update = torch.linalg.vector_norm(nxt[m] - ends[t][m]).item()
            dist = torch.linalg.vector_norm(ends[t][m] - ends[0][m]).item()
            got = (
                (rec.diagnostics["update_size"], rec.diagnostics["distance"])
                if m is None
                else (
                    rec.diagnostics_by_module["update_size"][m],
                    rec.diagnostics_by_module["distance"][m],
                )
            )
            assert got[0] == pytest.approx(update, rel=_TOL, abs=_TOL), (t, m)
            assert got[1] == pytest.approx(dist, rel=_TOL, abs=_TOL), (t, m)


def test_a_clamp_through_data_after_the_optimizer_step() -> None:
    """Weight clipping through ``p.data`` after ``opt.step()`` (no version bump): the update
    measured at the optimizer's hook is the optimizer's; the distance and the next step's
    snapshot see the clipped values (no refresh outside a backward pass)."""
    model = mlp()
    x = input_for(model, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ends, stepped = [], []
    with GradientMonitor(model, diagnostics=("update_size", "distance")) as monitor:
        for _ in range(4):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            ends.append(_flat(model))
            opt.step()
            stepped.append(_flat(model))
            for p in model.parameters():
                p.data.clamp_(-0.2, 0.2)
    for t, rec in enumerate(monitor.history):
        update = torch.linalg.vector_norm(stepped[t] - ends[t]).item()
        dist = torch.linalg.vector_norm(ends[t] - ends[0]).item()
        assert rec.diagnostics["update_size"] == pytest.approx(update, rel=_TOL)
        assert rec.diagnostics["distance"] == pytest.approx(dist, rel=_TOL, abs=_TOL)
