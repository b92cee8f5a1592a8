"""GradientMonitor's TIC against its definition: ``v`` from ``torch.func.vmap(grad)`` per-sample
gradients, ``h`` the diagonal of the full Hessian from ``torch.func.hessian`` (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from gradlab.hooks import GradientMonitor
from tests.per_sample._reference import reference_grads

_TOL = 1e-10
_EPS = 1e-7


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).sum(1).mean()


def _data(model: nn.Sequential, step: int, b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    shape = (b, 1, 6, 6) if isinstance(model[0], nn.Conv2d) else (b, 4)
    return torch.randn(*shape, dtype=torch.float64, generator=g), torch.randn(
        b, 3, dtype=torch.float64, generator=g
    )


def _reference(factory, model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """{group: (sum_j v_j/(h_j+eps), sum_j v_j, sum_j h_j)} with None the whole model."""
    twin = factory()
    twin.load_state_dict(model.state_dict())
    g = reference_grads(twin, _loss, x, y)
    params = {n: p.detach() for n, p in twin.named_parameters()}
    full = hessian(lambda p: _loss(functional_call(twin, p, (x,)), y))(params)
    h = {n: full[n][n].reshape(p.numel(), p.numel()).diagonal() for n, p in params.items()}
    v = {n: t.flatten(1).square().mean(0) for n, t in g.items()}
    out = {}
    for group in [None, *dict.fromkeys(n.rpartition(".")[0] for n in params)]:
        names = [n for n in params if group is None or n.rpartition(".")[0] == group]
        vv = torch.cat([v[n] for n in names])
        hh = torch.cat([h[n] for n in names])
        out[group] = (float((vv / (hh + _EPS)).sum()), float(vv.sum()), float(hh.sum()))
    return out


@pytest.mark.parametrize("factory", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_tic_equals_its_definition(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    refs = []
    with GradientMonitor(model, diagnostics=("tic", "tic_trace", "gsnr")) as monitor:
        for step in range(3):
            x, y = _data(model, step)
            refs.append(_reference(factory, model, x, y))
            opt.zero_grad()
            _loss(model(x), y).backward()
            if step != 1:  # opt-in per step: step 1 has none
                monitor.record_tic(lambda m, x=x, y=y: _loss(m(x), y))
            opt.step()
    history = monitor.history
    assert len(history) == 3
    assert math.isnan(history[1].diagnostics["tic"])
    assert math.isfinite(history[1].diagnostics["gsnr"])
    for step in (0, 2):
        rec = history[step]
        for group, (tic, v, h) in refs[step].items():
            if group is None:
                got_tic, got_trace = rec.diagnostics["tic"], rec.diagnostics["tic_trace"]
            else:
                got_tic = rec.diagnostics_by_module["tic"][group]
                got_trace = rec.diagnostics_by_module["tic_trace"][group]
            assert got_tic == pytest.approx(tic, rel=_TOL), group
            assert got_trace == pytest.approx(v / (h + _EPS), rel=_TOL), group


def test_sum_reduction_every_k_and_call_before_backward() -> None:
    model = _mlp()
    refs = []
    with GradientMonitor(model, diagnostics=("tic",), loss_reduction="sum", every=2) as monitor:
        for step in range(3):
            x, y = _data(model, step)
            refs.append(_reference(_mlp, model, x, y))
            model.zero_grad()
            out = model(x)

            def loss_fn(m: nn.Module, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                return _loss(m(x), y) * x.shape[0]

            monitor.record_tic(loss_fn)  # before backward; on step 1 it does nothing
            (_loss(out, y) * x.shape[0]).backward()
    history = monitor.history
    assert [bool(r.diagnostics) for r in history] == [True, False, True]
    for step in (0, 2):
        assert history[step].diagnostics["tic"] == pytest.approx(refs[step][None][0], rel=_TOL)


def test_bad_calls_are_refused_and_the_model_keeps_its_hooks() -> None:
    model = _mlp()
    x, y = _data(model, 0)
    with GradientMonitor(model, diagnostics=("gsnr",)) as monitor:
        _loss(model(x), y).backward()
        with pytest.raises(ValueError, match=r"record_tic: diagnostics must be one of 'tic'"):
            monitor.record_tic(lambda m: _loss(m(x), y))
    with GradientMonitor(model, diagnostics=("tic",)) as monitor:
        with pytest.raises(ValueError, match=r"record_tic: no forward of the model"):
            monitor.record_tic(lambda m: _loss(m(x), y))
        _loss(model(x), y).backward()
        with pytest.raises(TypeError, match=r"record_tic: loss_fn must be a function"):
            monitor.record_tic(3.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"scalar tensor, got \(6, 3\)"):
            monitor.record_tic(lambda m: m(x))
        hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
        monitor.record_tic(lambda m: _loss(m(x), y))
        assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
        with pytest.raises(ValueError, match=r"Hessian diagonal of step 0 was already taken"):
            monitor.record_tic(lambda m: _loss(m(x), y))
    assert len(monitor.history) == 1  # the Hessian passes were not recorded as steps
    assert math.isfinite(monitor.history[0].diagnostics["tic"])


def test_tic_matches_cockpit() -> None:
    """Cockpit's TICDiag and TICTrace with BackPACK's exact Hessian diagonal on the same run."""
    pytest.importorskip("cockpit")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.quantities import TICDiag, TICTrace
        from cockpit.utils.schedules import linear

    steps = 3
    theirs_model = extend(_mlp())
    lossfunc = extend(nn.MSELoss(reduction="mean"))
    ind = nn.MSELoss(reduction="none")
    opt = torch.optim.SGD(theirs_model.parameters(), lr=0.05)
    cp = Cockpit(theirs_model.parameters(), quantities=[TICDiag(linear(1)), TICTrace(linear(1))])
    for step in range(steps):
        x, y = _data(theirs_model, step)
        opt.zero_grad()
        out = theirs_model(x)
        loss = lossfunc(out, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = {"batch_size": x.shape[0], "individual_losses": ind(out, y).mean(1)}
            with cp(step, info={**info, "loss": loss, "optimizer": opt}):
                loss.backward(create_graph=cp.create_graph(step))
        opt.step()
    theirs = cp.get_output()

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, diagnostics=("tic", "tic_trace")) as monitor:
        for step in range(steps):
            x, y = _data(model, step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            monitor.record_tic(lambda m, x=x, y=y: nn.functional.mse_loss(m(x), y))
            opt.step()
    for rec in monitor.history:
        assert rec.diagnostics["tic"] == pytest.approx(theirs[rec.step]["TICDiag"], rel=1e-8)
        assert rec.diagnostics["tic_trace"] == pytest.approx(theirs[rec.step]["TICTrace"], rel=1e-8)
