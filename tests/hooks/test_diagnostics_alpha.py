"""GradientMonitor's loss statistics and step-size quality alpha against their definitions.

Float64 throughout. The references take per-sample gradients from ``torch.func.vmap(grad)``
(tests/per_sample/_reference.py) on hook-free copies of the model at each step's parameters,
build alpha's four observations along the actual update ``d = theta_{t+1} - theta_t`` and solve
the weighted least-squares fit with numpy's normal equations, as written in the docstring.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradlab.hooks import GradientMonitor
from gradlab.hooks._alpha import alpha_from_observations
from tests.per_sample._reference import reference_grads

_TOL = 1e-10


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()


def _losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).sum(1)  # l_i, shape (B,)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _losses(out, y).mean()


def _data(model: nn.Sequential, step: int, b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shape = (b, 2, 8, 8) if isinstance(model[0], nn.Conv2d) else (b, 5)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    return x, torch.randn(b, 3, dtype=torch.float64, generator=g)


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "plain_sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


class _Point:
    """One step's observations for the reference: theta, per-sample gradients and losses."""

    def __init__(self, factory, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
        twin = factory().to(x.device)
        twin.load_state_dict(model.state_dict())
        g = reference_grads(twin, _loss, x, y)
        self.g = torch.cat([t.flatten(1) for t in g.values()], 1).cpu().numpy()  # (B, P)
        self.theta = torch.cat([p.detach().flatten() for p in twin.parameters()]).cpu().numpy()
        with torch.no_grad():
            self.losses = _losses(twin(x), y).cpu().numpy()


def _alpha_reference(start: _Point, end: _Point) -> float:
    """The definition: four observations along d, a WLS quadratic, alpha = 2t/alpha_bar - 1."""
    d = end.theta - start.theta
    t = float(np.linalg.norm(d))
    if t == 0.0:
        return -1.0
    u = d / t
    p0, p1 = start.g @ u, end.g @ u
    y = np.array([start.losses.mean(), end.losses.mean(), p0.mean(), p1.mean()])
    var = np.array(
        [start.losses.var(ddof=1), end.losses.var(ddof=1), p0.var(ddof=1), p1.var(ddof=1)]
    )
    phi = np.array([[1, 0, 0], [1, t, t**2], [0, 1, 0], [0, 1, 2 * t]], dtype=np.float64)
    w = np.diag(1.0 / var)
    _, b, a = np.linalg.solve(phi.T @ w @ phi, phi.T @ w @ y)
    if a <= 0:
        return -1.0
    alpha_bar = -b / a
    return 2 * t / alpha_bar - 1


def _train(factory, opt_kind: str, device, steps: int = 4, *, after: bool = False, **kw):  # type: ignore[no-untyped-def]
    model = factory().to(device)
    opt = _optimizer(opt_kind, model)
    points = []
    with GradientMonitor(model, **kw) as monitor:
        for step in range(steps):
            x, y = (t.to(device) for t in _data(model, step))
            points.append(_Point(factory, model, x, y))
            opt.zero_grad()
            losses = _losses(model(x), y)
            if not after:
                monitor.record_loss(losses)
            losses.mean().backward()
            if after:
                monitor.record_loss(losses)
                _ = monitor.history[-1]  # a read between backward and the optimizer step
            opt.step()
    return monitor, points


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("factory", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_alpha_and_loss_statistics_equal_the_definition(factory, opt_kind, device) -> None:  # type: ignore[no-untyped-def]
    names = ("loss_mean", "loss_var", "alpha")
    monitor, points = _train(factory, opt_kind, device, diagnostics=names)
    history = monitor.history
    assert len(history) == 4
    for step, rec in enumerate(history):
        assert sorted(rec.diagnostics) == sorted(names)
        assert rec.diagnostics_by_module == {}  # whole-model instruments
        losses = points[step].losses
        mean = float(losses.sum() / losses.size)
        var = float(((losses - mean) ** 2).sum() / (losses.size - 1))
        assert rec.diagnostics["loss_mean"] == pytest.approx(mean, rel=_TOL)
        assert rec.diagnostics["loss_var"] == pytest.approx(var, rel=_TOL)
        if step + 1 < len(points):
            expected = _alpha_reference(points[step], points[step + 1])
            assert rec.diagnostics["alpha"] == pytest.approx(expected, rel=_TOL, abs=_TOL)
        else:
            assert math.isnan(rec.diagnostics["alpha"])  # no next step: not computable


def test_losses_recorded_after_backward_and_a_read_before_the_step() -> None:
    """record_loss after backward(), history read before opt.step(): the same alpha."""
    before, points = _train(_mlp, "adam", torch.device("cpu"), diagnostics=("alpha",))
    after, _ = _train(_mlp, "adam", torch.device("cpu"), diagnostics=("alpha",), after=True)
    got = [r.diagnostics["alpha"] for r in after.history][:-1]
    assert got == pytest.approx([r.diagnostics["alpha"] for r in before.history][:-1], rel=_TOL)
    assert got[0] == pytest.approx(_alpha_reference(points[0], points[1]), rel=_TOL)


def test_alpha_with_other_diagnostics_and_every_k() -> None:
    """every=2: alpha on steps 0, 2, 4 (end points 1, 3 run a per-sample pass but record no
    diagnostics); step 4 has no next step."""
    names = ("noise_scale", "alpha", "update_size")
    monitor, points = _train(_mlp, "sgd", torch.device("cpu"), steps=5, diagnostics=names, every=2)
    history = monitor.history
    assert [bool(r.diagnostics) for r in history] == [True, False, True, False, True]
    for step in (0, 2):
        expected = _alpha_reference(points[step], points[step + 1])
        assert history[step].diagnostics["alpha"] == pytest.approx(expected, rel=_TOL)
        d = points[step + 1].theta - points[step].theta
        assert history[step].diagnostics["update_size"] == pytest.approx(
            float(np.linalg.norm(d)), rel=_TOL
        )
    assert math.isnan(history[4].diagnostics["alpha"])


def test_state_dict_round_trip_and_scalars_keep_them() -> None:
    names = ("loss_mean", "loss_var", "alpha")
    monitor, _ = _train(_mlp, "adam", torch.device("cpu"), steps=3, diagnostics=names)
    logs = monitor.scalars(step=0)
    for name in names:
        assert logs[f"diagnostics/{name}"] == monitor.history[0].diagnostics[name]
    assert not [k for k in logs if k.startswith("diagnostics/alpha/")]  # whole model only
    other = GradientMonitor(_mlp(), diagnostics=names)
    other.load_state_dict(monitor.state_dict())
    for a, b in zip(other.history, monitor.history):
        assert a.diagnostics.keys() == b.diagnostics.keys()
        for k in names:
            assert a.diagnostics[k] == b.diagnostics[k] or (
                math.isnan(a.diagnostics[k]) and math.isnan(b.diagnostics[k])
            )


def test_alpha_without_losses_is_nan_and_zero_step_is_minus_one() -> None:
    model = _mlp()
    with GradientMonitor(model, diagnostics=("alpha",)) as monitor:
        for step in range(2):
            x, y = _data(model, step)
            _loss(model(x), y).backward()  # no record_loss
    assert all(math.isnan(r.diagnostics["alpha"]) for r in monitor.history)  # no losses
    with GradientMonitor(model, diagnostics=("alpha",)) as monitor:
        for step in range(2):
            x, y = _data(model, step)
            losses = _losses(model(x), y)
            monitor.record_loss(losses)
            losses.mean().backward()
    assert monitor.history[0].diagnostics["alpha"] == -1.0  # no step taken


@pytest.mark.parametrize(
    ("t", "expected"), [(0.5, -0.5), (1.0, 0.0), (2.0, 1.0), (3.0, 2.0)], ids=str
)
def test_alpha_of_an_exact_quadratic(t: float, expected: float) -> None:
    """Noise-free observations of q(x) = 1 - 2x + x^2 (minimum at 1, the start's height again
    at 2): alpha is -1 at no step, 0 at the minimum, 1 on the other side, whatever the
    weights."""
    q, dq = (lambda x: 1 - 2 * x + x * x), (lambda x: -2 + 2 * x)
    obs = {
        "alpha_t": t,
        "loss_mean": q(0.0),
        "alpha_f1": q(t),
        "alpha_df0": dq(0.0),
        "alpha_df1": dq(t),
        "loss_var": 0.3,
        "alpha_vf1": 2.0,
        "alpha_vdf0": 0.01,
        "alpha_vdf1": 0.0,  # exactly 0: replaced by a tiny variance, not a division by zero
    }
    assert alpha_from_observations(obs) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    concave = dict(obs, alpha_f1=1 - 2 * t - t * t, alpha_df1=-2 - 2 * t)
    assert alpha_from_observations(concave) == -1.0  # still going downhill
    assert alpha_from_observations(dict(obs, alpha_t=0.0)) == -1.0
    assert math.isnan(alpha_from_observations(dict(obs, loss_var=math.nan)))


def test_loss_statistics_of_one_sample_and_every_k() -> None:
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch degrees-of-freedom warning
        with GradientMonitor(model, diagnostics=("loss_mean", "loss_var"), every=2) as monitor:
            for step in range(3):
                x, y = _data(model, step, b=1)
                losses = _losses(model(x), y)
                monitor.record_loss(losses)  # every step: kept only where needed
                losses.mean().backward()
            history = monitor.history
    assert [bool(r.diagnostics) for r in history] == [True, False, True]
    assert history[2].diagnostics["loss_mean"] == float(losses[0].detach())  # the mean of one
    assert math.isnan(history[2].diagnostics["loss_var"])  # B = 1: undefined


def test_bad_losses_are_refused_with_the_fix() -> None:
    model = _mlp()
    x, y = _data(model, 0)
    with GradientMonitor(model, diagnostics=("noise_scale",)) as monitor:
        losses = _losses(model(x), y)
        with pytest.raises(ValueError, match=r"record_loss: diagnostics must be one of"):
            monitor.record_loss(losses)
    with GradientMonitor(model, diagnostics=("alpha", "loss_mean")) as monitor:
        with pytest.raises(ValueError, match=r"record_loss: no forward of the model"):
            monitor.record_loss(torch.ones(8, dtype=torch.float64))
        losses = _losses(model(x), y)
        with pytest.raises(ValueError, match=r"losses must have shape \(B,\).*got shape \(\)"):
            monitor.record_loss(losses.mean())
        with pytest.raises(ValueError, match=r"got shape \(8, 1\)"):
            monitor.record_loss(losses[:, None])
        with pytest.raises(TypeError, match=r"losses must be a tensor.*got list"):
            monitor.record_loss(losses.tolist())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"real floating-point tensor, got dtype torch.int64"):
            monitor.record_loss(torch.ones(8, dtype=torch.long))
        with pytest.raises(ValueError, match=r"one entry per sample.*B=8.*got shape \(4,\)"):
            monitor.record_loss(losses[:4])
        monitor.record_loss(losses)
        with pytest.raises(ValueError, match=r"losses of step 0 were already recorded"):
            monitor.record_loss(losses)
        losses.mean().backward()
    assert losses.requires_grad  # the user's tensor is left as it was


def test_contexts_and_hooks_are_released() -> None:
    """Nothing of the per-sample contexts outlives the monitor: no hook left on the model."""
    model = _mlp()
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, diagnostics=("alpha",)) as monitor:
        for step in range(2):
            x, y = _data(model, step)
            losses = _losses(model(x), y)
            monitor.record_loss(losses)
            losses.mean().backward()
            opt.step()
    after = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert after == before
    assert monitor._alpha is not None and not monitor._alpha._start


def test_alpha_matches_cockpit_on_plain_sgd() -> None:
    """Cockpit's Alpha (SGD without momentum, its own BackPACK projections) on the same run."""
    pytest.importorskip("cockpit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.quantities import Alpha
        from cockpit.utils.schedules import linear

    steps = 4
    cockpit_model = extend(_mlp())
    lossfunc = extend(nn.MSELoss(reduction="mean"))
    ind = nn.MSELoss(reduction="none")
    opt = torch.optim.SGD(cockpit_model.parameters(), lr=0.05)
    cp = Cockpit(cockpit_model.parameters(), quantities=[Alpha(linear(1))])
    for step in range(steps):
        x, y = _data(cockpit_model, step)
        opt.zero_grad()
        out = cockpit_model(x)
        loss = lossfunc(out, y)  # (1/(3B)) sum: a mean over samples of l_i / 3
        losses = ind(out, y).mean(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with cp(
                step,
                info={
                    "batch_size": x.shape[0],
                    "individual_losses": losses,
                    "loss": loss,
                    "optimizer": opt,
                },
            ):
                loss.backward(create_graph=cp.create_graph(step))
        opt.step()
    theirs = {s: v["Alpha"] for s, v in cp.get_output().items()}  # step -> {name: value}
    assert sorted(theirs) == list(range(steps - 1))

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, diagnostics=("alpha",)) as monitor:
        for step in range(steps):
            x, y = _data(model, step)
            opt.zero_grad()
            losses = ind(model(x), y).mean(1)
            monitor.record_loss(losses)
            losses.mean().backward()
            opt.step()
    ours = [r.diagnostics["alpha"] for r in monitor.history]
    for step in range(steps - 1):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-8), step


def test_resuming_from_a_checkpoint_keeps_the_saved_values() -> None:
    """The saved steps keep their values (the last one's alpha stays NaN: its end point was
    not saved); the resumed run computes alpha from its own steps on."""
    names = ("loss_mean", "alpha")
    model = _mlp()
    opt = _optimizer("adam", model)

    def step(monitor: GradientMonitor, k: int) -> _Point:
        x, y = _data(model, k)
        point = _Point(_mlp, model, x, y)
        opt.zero_grad()
        losses = _losses(model(x), y)
        monitor.record_loss(losses)
        losses.mean().backward()
        opt.step()
        return point

    with GradientMonitor(model, diagnostics=names) as first:
        for k in range(2):
            step(first, k)
    saved = [dict(r.diagnostics) for r in first.history]
    resumed = GradientMonitor(model, diagnostics=names)
    resumed.load_state_dict(first.state_dict())
    with resumed:
        points = [step(resumed, k) for k in range(2, 5)]
    history = resumed.history
    assert [r.step for r in history] == [0, 1, 2, 3, 4]
    for got, want in zip(history[:2], saved):
        assert got.diagnostics["loss_mean"] == want["loss_mean"]
    assert history[0].diagnostics["alpha"] == saved[0]["alpha"]
    assert math.isnan(history[1].diagnostics["alpha"])
    for k in (2, 3):
        expected = _alpha_reference(points[k - 2], points[k - 1])
        assert history[k].diagnostics["alpha"] == pytest.approx(expected, rel=_TOL)


def test_alpha_of_a_scaled_loss_is_that_of_the_unscaled_one() -> None:
    """With a GradScaler (a power-of-two scale: exact in floating point) the projections are
    unscaled: the same alpha as without it."""

    def run(scaled: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        with GradientMonitor(model, diagnostics=("alpha",), scaler=scaler) as monitor:
            for step in range(3):
                x, y = (t.float() for t in _data(model, step))
                opt.zero_grad()
                losses = _losses(model(x), y)
                monitor.record_loss(losses)
                scaler.scale(losses.mean()).backward()
                scaler.step(opt)
                scaler.update()
        return [r.diagnostics["alpha"] for r in monitor.history][:2]

    plain, scaled = run(False), run(True)
    assert all(math.isfinite(a) for a in plain)
    assert scaled == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_write_tensorboard_logs_alpha_once_it_is_known(every: int) -> None:
    from gradlab.hooks import write_tensorboard

    class Writer:
        def __init__(self) -> None:
            self.alpha: list[tuple[int, float]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            if tag == "diagnostics/alpha":
                self.alpha.append((step, value))

    model = _mlp()
    opt = _optimizer("adam", model)
    writer = Writer()
    with GradientMonitor(model, diagnostics=("alpha",), every=every) as monitor:
        for step in range(5):
            x, y = _data(model, step)
            opt.zero_grad()
            losses = _losses(model(x), y)
            monitor.record_loss(losses)
            losses.mean().backward()
            opt.step()
            write_tensorboard(writer, monitor, step=100 + step)
    expected = [
        (100 + r.step, r.diagnostics["alpha"])
        for r in monitor.history
        if r.diagnostics and math.isfinite(r.diagnostics["alpha"])
    ]
    assert len(expected) == 4 // every
    assert writer.alpha == expected  # each once, under its own step, never NaN
