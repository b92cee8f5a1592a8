"""GradientMonitor in real training runs: checkpoints, loggers, mixed precision, DDP, reprs."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor, StepStats
from gradlab.hooks._monitor import HISTORY_SIZE
from tests._distributed import run_gloo
from tests.hooks._helpers import NaNLayer


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    # A NaN-making layer (armed on one step only) so the run has a non-finite step to save.
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), NaNLayer(), nn.Linear(8, 3)).double()


def _train(
    model: nn.Sequential, monitor: GradientMonitor, steps: range, opt: torch.optim.Optimizer
) -> None:
    with monitor:
        for k in steps:
            x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            model[2].armed = k == 2
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if k != 2:  # skip the update of the NaN step, as a scaler would
                opt.step()


def _same(a: Sequence[StepStats], b: Sequence[StepStats]) -> bool:
    """Equal step by step, every float to the last bit (NaN equal to NaN: compared by repr)."""
    return [repr(dataclasses.astuple(r)) for r in a] == [repr(dataclasses.astuple(r)) for r in b]


def test_resumed_monitor_matches_an_uninterrupted_one() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    full = GradientMonitor(model, vanishing=0.1, exploding=0.3)
    _train(model, full, range(6), opt)

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = GradientMonitor(model, vanishing=0.1, exploding=0.3)
    _train(model, first, range(3), opt)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "monitor": first.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model = _net()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(checkpoint["opt"])
    resumed = GradientMonitor(model)  # default thresholds: the saved ones are restored
    resumed.load_state_dict(checkpoint["monitor"])
    assert resumed.steps == 3 and resumed.first_nonfinite == "2"
    _train(model, resumed, range(3, 6), opt)

    assert resumed.steps == full.steps == 6
    assert (resumed.vanishing, resumed.exploding) == (0.1, 0.3)
    assert _same(resumed.history, full.history)  # every number, flag and source
    assert resumed.nonfinite_source == full.nonfinite_source == ("2", 2, "backward")
    assert any(r.exploding for r in full.history) and any(r.vanishing for r in full.history)
    assert full.history[2].nonfinite and not full.history[3].nonfinite  # both kinds of record


def test_state_dict_survives_pickle_and_deepcopy_and_is_a_snapshot() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model)
    _train(model, monitor, range(4), opt)
    state = monitor.state_dict()
    for copied in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
        other = GradientMonitor(model)
        other.load_state_dict(copied)
        assert _same(other.history, monitor.history)
        assert other.nonfinite_source == monitor.nonfinite_source
        again = GradientMonitor(model)  # a loaded monitor saves what it loaded
        again.load_state_dict(other.state_dict())
        assert _same(again.history, monitor.history) and again.steps == 4
    saved = copy.deepcopy(state)
    _train(model, monitor, range(4, 5), opt)  # later steps do not change the snapshot
    assert len(state["history"]) == 4 and state["steps"] == 4
    GradientMonitor(model).load_state_dict(state)  # and loading leaves it as it was
    assert all(
        torch.equal(a["vals"], b["vals"])
        for a, b in zip(state["history"], saved["history"])
        if "vals" in a
    )


def test_load_into_a_smaller_history_keeps_the_last_steps() -> None:
    model = _net()
    monitor = GradientMonitor(model)
    _train(model, monitor, range(5), torch.optim.SGD(model.parameters(), lr=0.1))
    small = GradientMonitor(model, history_size=2)
    small.load_state_dict(monitor.state_dict())
    assert [r.step for r in small.history] == [3, 4] and small.steps == 5
    assert small.first_nonfinite_step == 2  # kept although its step left the history


def test_monitor_itself_refuses_pickle_and_copy() -> None:
    monitor = GradientMonitor(_net())
    for attempt in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="GradientMonitor: a monitor cannot be pickled"):
            attempt(monitor)


def test_load_state_dict_errors() -> None:
    monitor = GradientMonitor(_net())
    with pytest.raises(TypeError, match=r"GradientMonitor\.load_state_dict: state_dict must be"):
        monitor.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict lacks 'steps'"):
        monitor.load_state_dict({"version": 1, "history": []})
    state = monitor.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="has version 99, this gradlab reads versions 1, 2"):
        monitor.load_state_dict(state)


def test_history_is_bounded_by_default() -> None:
    model = nn.Linear(2, 1)
    x = torch.randn(3, 2)
    with GradientMonitor(model) as monitor:
        for _ in range(HISTORY_SIZE + 3):
            model(x).sum().backward()
    assert monitor.history_size == HISTORY_SIZE == 1000
    assert len(monitor.history) == HISTORY_SIZE and monitor.steps == HISTORY_SIZE + 3
    assert monitor.history[0].step == 3 and monitor.history[-1].step == HISTORY_SIZE + 2


def _mlp32() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )


def test_scalars_are_the_history_under_stable_keys() -> None:
    model = _mlp32()
    with GradientMonitor(model) as monitor:
        for _ in range(2):
            model(torch.randn(8, 5)).pow(2).sum().backward()
    rec = monitor.history[0]
    logs = monitor.scalars(step=0)
    assert logs["grad/output/2/norm"] == rec.outputs["2"].norm
    assert logs["grad/output/4/mean_abs"] == rec.outputs["4"].mean_abs
    assert logs["grad/param/0.weight/max_abs"] == rec.params["0.weight"].max_abs
    total = torch.cat([p.grad.flatten() for p in model.parameters()])  # after both steps
    assert monitor.scalars()["grad/total_norm"] == pytest.approx(total.norm().item(), rel=1e-6)
    assert set(logs) == set(monitor.scalars())  # the same keys every step
    assert all(type(v) is float for v in logs.values())
    modules, params = ["0", "1", "2", "3", "4"], [n for n, _ in model.named_parameters()]
    expected = {
        f"grad/{kind}/{n}/{stat}"
        for kind, names in (("output", modules), ("param", params))
        for n in names
        for stat in ("norm", "max_abs", "mean_abs")
    } | {"grad/total_norm", "grad/vanishing", "grad/exploding", "grad/nonfinite"}
    assert set(logs) == expected
    leaf = nn.Linear(3, 1)
    with GradientMonitor(leaf, params=False) as root:
        leaf(torch.randn(2, 3)).sum().backward()
    assert sorted(root.scalars()) == [
        "grad/exploding",
        "grad/nonfinite",
        "grad/output/model/max_abs",
        "grad/output/model/mean_abs",
        "grad/output/model/norm",
        "grad/vanishing",
    ]


def test_scalars_errors() -> None:
    monitor = GradientMonitor(_mlp32())
    with pytest.raises(ValueError, match=r"GradientMonitor\.scalars: no backward pass recorded"):
        monitor.scalars()
    model = _mlp32()
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 5)).sum().backward()
    with pytest.raises(ValueError, match=r"step=1 is out of range for 1 recorded steps"):
        monitor.scalars(step=1)
    with pytest.raises(TypeError, match=r"GradientMonitor\.scalars: step must be an int"):
        monitor.scalars(step=0.0)  # type: ignore[arg-type]


def test_scalars_in_real_tensorboard_event_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _mlp32()
    logged = []
    writer = SummaryWriter(log_dir=str(tmp_path))
    try:
        with GradientMonitor(model) as monitor:
            for step in range(3):
                model(torch.randn(8, 5)).pow(2).sum().backward()
                logs = monitor.scalars()
                for key, value in logs.items():
                    writer.add_scalar(key, value, global_step=step)
                logged.append(logs)
    finally:
        writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert set(tags) == set(logged[0])
    for key in ("grad/output/2/norm", "grad/param/4.bias/mean_abs", "grad/total_norm"):
        read = events.Scalars(key)
        assert [e.step for e in read] == [0, 1, 2]
        expected = [logs[key] for logs in logged]
        assert [e.value for e in read] == pytest.approx(expected, rel=1e-6)  # stored as float32


def _amp_run(
    scaler: torch.amp.GradScaler | None, steps: int, autocast: torch.dtype | None
) -> tuple[GradientMonitor, nn.Sequential]:
    model = _mlp32()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(3))
    monitor = GradientMonitor(model, scaler=scaler)
    with monitor:
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                loss = model(x).float().pow(2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return monitor, model


def _assert_same_norms(a: StepStats, b: StepStats, rel: float) -> None:
    assert list(a.outputs) == list(b.outputs) and list(a.params) == list(b.params)
    for mine, theirs in ((a.outputs, b.outputs), (a.params, b.params)):
        for name in mine:
            for got, want in zip(mine[name], theirs[name]):
                assert got == pytest.approx(want, rel=rel), (name, got, want)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "autocast-bf16"])
def test_scaled_run_gives_the_unscaled_statistics(autocast: torch.dtype | None) -> None:
    plain, _ = _amp_run(None, 5, autocast)
    # growth_interval=2: the scale doubles during the run; each step uses its own scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    scaled, _ = _amp_run(scaler, 5, autocast)
    assert [r.scale for r in scaled.history] == [2.0**16, 2.0**16, 2.0**17, 2.0**17, 2.0**18]
    for a, b in zip(scaled.history, plain.history):
        _assert_same_norms(a, b, rel=1e-5)
        assert a.vanishing == b.vanishing and not a.skipped
    logs = scaled.scalars()
    assert logs["grad/scale"] == 2.0**18 and logs["grad/skipped"] == 0.0
    assert logs["grad/total_norm"] == pytest.approx(plain.scalars()["grad/total_norm"], rel=1e-5)


def test_steps_the_scaler_skips_are_marked_not_blamed() -> None:
    # float16 autocast with a loss scale of 2**20: the scaled float16 gradients overflow, the
    # scaler skips two steps (halving the scale each time), then runs at 2**18.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    scaled, _ = _amp_run(scaler, 4, torch.float16)
    history = list(scaled.history)
    assert [r.skipped for r in history] == [True, True, False, False]
    assert [r.scale for r in history] == [2.0**20, 2.0**19, 2.0**18, 2.0**18]
    assert all(r.nonfinite and r.source is None for r in history[:2])  # nobody is blamed
    assert scaled.first_nonfinite is None and scaled.nonfinite_source is None
    assert [scaled.scalars(step=k)["grad/skipped"] for k in range(4)] == [1.0, 1.0, 0.0, 0.0]
    # The skipped steps did not move the weights: the finite steps are those of a run that
    # started at the scale the scaler settled on.
    settled, _ = _amp_run(torch.amp.GradScaler("cpu", init_scale=2.0**18), 2, torch.float16)
    _assert_same_norms(history[2], settled.history[0], rel=1e-5)
    _assert_same_norms(history[3], settled.history[1], rel=1e-5)
    # and they are unscaled: close to a float32 run (float16 rounding apart)
    plain, _ = _amp_run(None, 1, None)
    _assert_same_norms(history[2], plain.history[0], rel=2e-3)


def test_scaler_argument_is_checked() -> None:
    with pytest.raises(
        TypeError, match=r"GradientMonitor: scaler must be a torch\.amp\.GradScaler"
    ):
        GradientMonitor(_mlp32(), scaler=2.0**16)  # type: ignore[arg-type]
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    monitor, _ = _amp_run(disabled, 1, None)
    assert monitor.history[0].scale == 1.0 and not monitor.history[0].skipped


def test_step_stats_repr_is_short() -> None:
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(60)])
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 6)).sum().backward()
    text = repr(monitor.history[-1])
    assert text.startswith("StepStats(step=0, outputs=<60 modules, norm ")
    assert "params=<120 parameters" in text and "source=None" in text
    assert len(text) < 250 and "\n" not in text
    assert (
        repr(monitor)
        == "GradientMonitor(60 modules, 120 parameters, 1 steps, first_nonfinite=None)"
    )


def _ddp_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _ddp_batch(rank: int) -> torch.Tensor:
    return torch.randn(
        3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank)
    )


def _ddp_step(rank: int, tmp: str) -> None:
    """One rank's step (its DDP wrapper is freed when it returns, before the teardown)."""
    ddp = nn.parallel.DistributedDataParallel(_ddp_net())
    with GradientMonitor(ddp) as monitor:
        ddp(_ddp_batch(rank)).pow(2).sum().backward()
    averaged = {n: p.grad.norm().item() for n, p in ddp.module.named_parameters()}
    torch.save({"scalars": monitor.scalars(), "grad": averaged}, f"{tmp}/rank{rank}.pt")


def _local_reference(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """d loss / d (output of each layer) and d loss / d (each parameter) on rank's own batch."""
    net = _ddp_net()
    h, outs = _ddp_batch(rank), []
    for m in net:
        h = m(h)
        outs.append(h)
    loss = h.pow(2).sum()
    grads = torch.autograd.grad(loss, [*outs, *net.parameters()])
    return list(grads[: len(outs)]), list(grads[len(outs) :])


def test_ddp_rank_sees_its_local_gradients(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_gloo(_ddp_step, (str(tmp_path),), tmp_path, fork_server=True)
    names = [n for n, _ in _ddp_net().named_parameters()]
    refs = [_local_reference(r) for r in range(2)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        outs, params = refs[rank]
        for i, g in enumerate(outs):  # output gradients: this rank's own, before any reduction
            assert got["scalars"][f"grad/output/module.{i}/norm"] == pytest.approx(
                g.norm().item(), rel=1e-12
            )
        for n, g in zip(names, params):  # parameter statistics: the local gradient too
            assert got["scalars"][f"grad/param/module.{n}/norm"] == pytest.approx(
                g.norm().item(), rel=1e-12
            )
        for n, g0, g1 in zip(names, refs[0][1], refs[1][1]):  # .grad after backward: averaged
            assert got["grad"][n] == pytest.approx(((g0 + g1) / 2).norm().item(), rel=1e-12)
    assert refs[0][1][0].norm().item() != pytest.approx(refs[1][1][0].norm().item(), rel=1e-3)


def test_result_reprs_show_shapes_not_values() -> None:
    from gradlab.hooks import capture_grads, retain_grads

    model = nn.Sequential(*[nn.Linear(30, 30) for _ in range(12)])
    x = torch.randn(40, 30, requires_grad=True)
    ys = [x * k for k in range(10)]
    with capture_grads(model) as grads, retain_grads(*ys) as kept:
        (model(sum(ys)).sum()).backward()
    text = repr(grads)
    assert text.startswith("CapturedGrads(of='output', {'0': (40, 30), '1': (40, 30)")
    assert text.endswith("... 4 more})") and "tensor" not in text
    text = repr(kept)
    assert text.startswith("RetainedGrads([Tensor(40, 30), ") and text.endswith("... 2 more])")
    assert "tensor" not in text and len(text) < 200
