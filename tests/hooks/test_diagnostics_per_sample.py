"""GradientMonitor's per-sample diagnostics against the formulas computed from vmap(grad).

Float64 throughout; the references take per-sample gradients from ``torch.func.vmap(grad)``
(tests/per_sample/_reference.py) and write each formula out exactly as the docstring states it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gradlab._errors import GradlabError
from gradlab.hooks import GradientMonitor
from tests.per_sample._reference import WeightUsedOutside, reference_grads

_NAMES = ("noise_scale", "gsnr", "norm_test", "inner_product_test", "orthogonality_test")
_TOL = 1e-10
_EPS = 1e-5


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


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).sum(1).mean()  # the mean over the batch of per-sample terms l_i


def _data(model: nn.Sequential, step: int, b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    shape = (b, 2, 8, 8) if isinstance(model[0], nn.Conv2d) else (b, 5)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    return x, torch.randn(b, 3, dtype=torch.float64, generator=g)


def _formulas(g: torch.Tensor) -> dict[str, float]:
    """The issue's formulas, from per-sample gradients ``g`` of shape (B, P)."""
    b = g.shape[0]
    m = g.mean(0)
    m2 = float(m @ m)
    s = float(((g - m) ** 2).sum()) / (b - 1)
    dots = g @ m
    return {
        "noise_scale": s / (m2 - s / b),
        "gsnr": float((m**2 / ((g**2).mean(0) - m**2 + _EPS)).mean()),
        "norm_test": math.sqrt(s / (b * m2)),
        "inner_product_test": math.sqrt(float((dots**2).sum() - b * m2**2) / (b - 1) / (b * m2**2)),
        "orthogonality_test": math.sqrt(
            float((g**2).sum() - (dots**2).sum() / m2) / (b - 1) / (b * m2)
        ),
    }


def _ref(factory, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """vmap(grad) per-sample gradients on a hook-free copy of ``model`` (same parameters)."""
    twin = factory().to(x.device)
    twin.load_state_dict(model.state_dict())
    return reference_grads(twin, _loss, x, y)


def _owners(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters()))


def _flat(grads: dict[str, torch.Tensor], module: str | None) -> torch.Tensor:
    return torch.cat(
        [
            t.flatten(1)
            for n, t in grads.items()
            if module is None or n.rpartition(".")[0] == module
        ],
        dim=1,
    )


def _check_history(
    monitor: GradientMonitor,
    refs: list[dict[str, torch.Tensor]],
    model: nn.Module | None = None,
    names: tuple[str, ...] = _NAMES,
) -> None:
    """Each recorded step's diagnostics ``names`` equal the formulas on its reference
    per-sample gradients: for the whole model, and with ``model`` for each of its modules."""
    for rec, grads in zip(monitor.history, refs):
        expected = _formulas(_flat(grads, None))
        for name in names:
            assert rec.diagnostics[name] == pytest.approx(expected[name], rel=_TOL), name
        for module in [] if model is None else _owners(model):
            expected = _formulas(_flat(grads, module))
            for name in names:
                got = rec.diagnostics_by_module[name][module]
                assert got == pytest.approx(expected[name], rel=_TOL), (name, module)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("factory", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_every_diagnostic_equals_its_formula(factory, opt_kind, device) -> None:  # type: ignore[no-untyped-def]
    model = factory().to(device)
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES) as monitor:
        for step in range(3):
            x, y = (t.to(device) for t in _data(model, step))
            refs.append(_ref(factory, model, x, y))
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
    _check_history(monitor, refs, model)


def test_per_module_sums_without_the_group_matrix(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Models with many parameters sum per module by index_add instead of a 0/1 matrix: the
    same values."""
    import gradlab.hooks._persample as persample

    monkeypatch.setattr(persample, "_MATRIX_MAX", 0)
    factory = _cnn
    model = factory()
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES) as monitor:
        for step in range(2):
            x, y = _data(model, step)
            refs.append(_ref(factory, model, x, y))
            model.zero_grad()
            _loss(model(x), y).backward()
    _check_history(monitor, refs, model)


def test_sum_reduction_and_gradient_accumulation() -> None:
    """loss_reduction='sum'; .grad accumulated over two steps does not enter m."""
    factory = _mlp
    model = factory()
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES, loss_reduction="sum") as monitor:
        for step in range(2):  # no zero_grad: .grad holds both steps' sum
            x, y = _data(model, step)
            refs.append(_ref(factory, model, x, y))
            (_loss(model(x), y) * x.shape[0]).backward()
    _check_history(monitor, refs)


def test_ema_smooths_numerator_and_denominator_separately() -> None:
    model = _mlp()
    a = 0.75
    num = den = 0.0
    with GradientMonitor(model, diagnostics=("noise_scale",), ema=a) as monitor:
        for step in range(3):
            x, y = _data(model, step)
            g = _flat(_ref(_mlp, model, x, y), None)
            b, m = g.shape[0], g.mean(0)
            s = float(((g - m) ** 2).sum()) / (b - 1)
            num = a * num + (1 - a) * s
            den = a * den + (1 - a) * (float(m @ m) - s / b)
            _loss(model(x), y).backward()
            assert monitor.history[-1].diagnostics["noise_scale"] == pytest.approx(
                num / den, rel=_TOL
            )


def test_every_k_and_scalars_and_state_dict() -> None:
    model = _mlp()
    with GradientMonitor(model, diagnostics=("gsnr", "noise_scale"), every=2) as monitor:
        for step in range(3):
            x, y = _data(model, step)
            _loss(model(x), y).backward()
    history = monitor.history
    assert [bool(r.diagnostics) for r in history] == [True, False, True]
    logs = monitor.scalars()
    assert logs["diagnostics/gsnr"] == history[-1].diagnostics["gsnr"]
    assert (
        logs["diagnostics/noise_scale/2"] == history[-1].diagnostics_by_module["noise_scale"]["2"]
    )
    other = GradientMonitor(model, diagnostics=("gsnr", "noise_scale"), every=2)
    other.load_state_dict(monitor.state_dict())
    assert [r.diagnostics for r in other.history] == [r.diagnostics for r in history]


def test_batch_of_one_gives_nan_with_one_warning() -> None:
    model = _mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, diagnostics=_NAMES) as monitor:
            for step in range(2):
                x, y = _data(model, step, b=1)
                _loss(model(x), y).backward()
            history = monitor.history
    ours = [w for w in caught if "batch size 1" in str(w.message)]
    assert len(ours) == 1
    for rec in history:
        for name in ("noise_scale", "norm_test", "inner_product_test", "orthogonality_test"):
            assert math.isnan(rec.diagnostics[name])
        assert math.isfinite(rec.diagnostics["gsnr"])  # defined for B = 1


def test_batchnorm_in_training_is_the_per_sample_engines_error() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    monitor = GradientMonitor(model, diagnostics=("noise_scale",))
    with pytest.raises(
        ValueError, match=r"PerSampleGradients: model has .*\(BatchNorm1d\) using batch"
    ):
        monitor.__enter__()
    assert not monitor._active
    model.eval()  # running statistics: the samples are independent again
    with GradientMonitor(model, diagnostics=("noise_scale",)) as monitor:
        x, y = _data(_mlp(), 0)
        _loss(model(x), y).backward()
    assert math.isfinite(monitor.history[0].diagnostics["noise_scale"])


def _eval_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double()
    model(torch.randn(16, 5, dtype=torch.float64))  # running statistics
    return model.eval()


@pytest.mark.parametrize("read_each_step", [False, True], ids=["next_forward", "history_read"])
def test_a_replayed_module_over_several_steps(read_each_step: bool) -> None:
    """An eval-mode BatchNorm has no closed form: the engine replays it with torch.func when a
    step is finished (at the next forward or a read, inside the context). The replay must not
    fire the monitor's own hooks (it crashed under vmap from the second step on)."""
    model = _eval_bn()
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES) as monitor:
        for step in range(3):
            x, y = _data(_mlp(), step)
            refs.append(_ref(_eval_bn, model, x, y))
            _loss(model(x), y).backward()
            if read_each_step:
                assert len(monitor.history) == step + 1
    assert [r.step for r in monitor.history] == [0, 1, 2]
    assert list(monitor.history[0].outputs) == ["0", "1", "2", "3"]  # no replay recorded
    _check_history(monitor, refs)


def test_batchnorm_put_in_training_during_the_run_is_refused_and_hooks_go() -> None:
    """The engine's hooks stay from step to step: a BatchNorm switched to training mode after
    the first step is refused at its forward, and the monitor's exit removes every hook."""
    from tests.hooks._helpers import hook_counts

    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    model.eval()
    before = hook_counts(model)
    x, y = _data(_mlp(), 0)
    with pytest.raises(
        ValueError, match=r"PerSampleGradients: model has .*\(BatchNorm1d\) using batch"
    ):
        with GradientMonitor(model, diagnostics=("noise_scale",)) as monitor:
            _loss(model(x), y).backward()
            _ = monitor.history  # step 0 finished (its eval-mode BatchNorm replayed) first
            model.train()
            _loss(model(x), y).backward()
    assert math.isfinite(monitor.history[0].diagnostics["noise_scale"])
    assert hook_counts(model) == before


def test_no_hooks_left_behind() -> None:
    from tests.hooks._helpers import hook_counts

    model = _mlp()
    before = hook_counts(model)
    with GradientMonitor(model, diagnostics=(*_NAMES, "update_size", "distance")) as monitor:
        x, y = _data(model, 0)
        _loss(model(x), y).backward()
    assert hook_counts(model) == before
    assert len(monitor.history[0].diagnostics) == 7


def test_ema_state_survives_a_checkpoint() -> None:
    def run(monitor: GradientMonitor, model: nn.Module, steps: range) -> None:
        with monitor:
            for step in steps:
                x, y = _data(_mlp(), step)
                _loss(model(x), y).backward()

    model = _mlp()
    full = GradientMonitor(model, diagnostics=("noise_scale",), ema=0.8)
    run(full, model, range(4))
    model = _mlp()
    first = GradientMonitor(model, diagnostics=("noise_scale",), ema=0.8)
    run(first, model, range(2))
    resumed = GradientMonitor(model, diagnostics=("noise_scale",), ema=0.8)
    resumed.load_state_dict(first.state_dict())
    run(resumed, model, range(2, 4))
    assert [r.diagnostics for r in resumed.history] == [r.diagnostics for r in full.history]


def test_steps_between_every_k_run_no_per_sample_hooks() -> None:
    model = _mlp()
    counts = []
    with GradientMonitor(model, diagnostics=("noise_scale",), every=2):
        for step in range(3):
            x, y = _data(model, step)
            out = model(x)
            counts.append(len(model[0]._forward_hooks))  # during the step's forward
            _loss(out, y).backward()
    assert counts[1] == counts[0] - 1 == counts[2] - 1, counts  # step 1: the monitor's hook only


def test_grads_zeroed_in_place_before_the_next_forward_do_not_leak_in() -> None:
    """zero_grad(set_to_none=False) and a weight-decayed Adam step modify .grad in place between
    the backward and the moment the step's diagnostics are computed (the next forward)."""
    factory = _mlp
    model = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES) as monitor:
        for step in range(3):
            x, y = _data(model, step)
            refs.append(_ref(factory, model, x, y))
            opt.zero_grad(set_to_none=False)
            _loss(model(x), y).backward()
            opt.step()
    _check_history(monitor, refs)


@pytest.mark.parametrize("factory", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_under_a_grad_scaler_the_diagnostics_are_of_the_unscaled_gradients(factory) -> None:  # type: ignore[no-untyped-def]
    """The loss scaled by a GradScaler (scale 2^10): every diagnostic as without it."""
    model = factory()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data(model, 0)
    ref = _ref(factory, model, x, y)
    with GradientMonitor(model, diagnostics=_NAMES, scaler=scaler) as monitor:
        scaler.scale(_loss(model(x), y)).backward()
    expected = _formulas(_flat(ref, None))
    for name in _NAMES:
        assert monitor.history[0].diagnostics[name] == pytest.approx(expected[name], rel=_TOL)


def _mlp_strided() -> nn.Sequential:
    """The MLP with its first weight stored transposed (non-contiguous: its gradient is too)."""
    model = _mlp()
    w = model[0].weight.detach()
    model[0].weight = nn.Parameter(w.t().contiguous().t())
    return model


def test_a_non_contiguous_gradient_among_contiguous_ones() -> None:
    """||m||^2 of a non-contiguous gradient is a tensor, the others' are BLAS floats: the
    mixed list is summed in float64 (it once went through float32, off by ~1e-8)."""
    model = _mlp_strided()
    assert not model[0].weight.is_contiguous()
    names = ("noise_scale", "norm_test", "inner_product_test", "orthogonality_test")
    refs = []
    with GradientMonitor(model, diagnostics=names) as monitor:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            x, y = _data(model, step)
            refs.append(_ref(_mlp_strided, model, x, y))
            _loss(model(x), y).backward()
    assert not model[0].weight.grad.is_contiguous()
    _check_history(monitor, refs, names=names)


def test_a_parameter_used_outside_its_module_is_the_engines_error() -> None:
    # The monitor's leaf hooks report each parameter's gradient to the per-sample engine, which
    # then puts no hook of its own on it: its check must still see a weight that received a
    # gradient without its module's forward running (as PerSampleGradients alone does).
    model = WeightUsedOutside()
    with pytest.raises(GradlabError, match=r"'lin.weight' received a gradient, but not through"):
        with GradientMonitor(model, diagnostics=("noise_scale",)) as monitor:
            model(torch.randn(4, 3)).sum().backward()
            _ = monitor.history


class _Shared(nn.Module):
    """gsnr summed two ways: in the leaf hook from the engine's moments (layers used once), or
    from a copy at the step's end (a layer called twice and a weight tied between two layers:
    their gradients arrive summed over the uses)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 6)
        self.twice = nn.Linear(6, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(torch.tanh(self.b(torch.tanh(self.a(h)))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("blas", [True, False], ids=["blas", "torch"])
@pytest.mark.parametrize("tic", [False, True], ids=["gsnr", "gsnr_tic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gsnr_in_the_leaf_hook_and_from_a_copy(
    monkeypatch, dtype, tic, blas, reduction, device
) -> None:  # type: ignore[no-untyped-def]
    """gsnr, each module's and the whole model's, against the formula, whichever way each
    parameter's sum is taken (in the leaf hook by numpy/BLAS, or by torch ops as without SciPy
    or on CUDA). With TIC, which reads the engine's ``sum_i g_i^2`` after the leaf hooks ran,
    those stay intact (compared with the reference's). float32: the monitor's float32 sums
    against the float64 formula on the same parameters (relative error ~2e-7; 1e-5 leaves
    room)."""
    import gradlab.hooks._persample as persample
    import gradlab.hooks._stats as stats
    import gradlab.hooks._tic as tic_mod

    if not blas:
        monkeypatch.setattr(stats, "_BLAS", {})

    in_hook: set[str] = set()
    copied: set[str] = set()
    seen_v: list[dict[str, torch.Tensor]] = []
    cls = persample.PerSampleSteps
    term, copy, moments = cls._gsnr_term, cls._copied_terms, tic_mod.TicSteps.moments

    def spy_term(self, name, g):  # type: ignore[no-untyped-def]
        out = term(self, name, g)
        if out is not None:
            in_hook.add(name)
        return out

    def spy_copy(self, ps, names, grads, idx, *args):  # type: ignore[no-untyped-def]
        copied.update(names[i] for i in idx)
        return copy(self, ps, names, grads, idx, *args)

    def spy_moments(self, step, ps, *args):  # type: ignore[no-untyped-def]
        seen_v.append({n: t.clone() for n, t in ps.sum_sq.items()})
        return moments(self, step, ps, *args)

    monkeypatch.setattr(cls, "_gsnr_term", spy_term)
    monkeypatch.setattr(cls, "_copied_terms", spy_copy)
    monkeypatch.setattr(tic_mod.TicSteps, "moments", spy_moments)

    def factory() -> nn.Module:
        return _Shared().double()

    model = _Shared().to(device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refs = []
    names = ("gsnr", "tic") if tic else ("gsnr",)
    scale = 8.0 if reduction == "sum" else 1.0  # loss = sum_i l_i over the batch of 8
    with GradientMonitor(model, diagnostics=names, loss_reduction=reduction) as monitor:
        for step in range(2):
            x, y = (t.to(device) for t in _data(_mlp(), step))
            refs.append(_ref(factory, model, x, y))
            opt.zero_grad()
            (_loss(model(x.to(dtype)), y.to(dtype)) * scale).backward()
            opt.step()
    # a's bias too: the engine takes a call with a shared parameter as a whole by summing
    assert copied == {"twice.weight", "twice.bias", "a.weight", "a.bias"}
    assert in_hook == {n for n, _ in model.named_parameters()} - copied
    tol = _TOL if dtype == torch.float64 else 1e-5
    for rec, grads in zip(monitor.history, refs):
        assert rec.diagnostics["gsnr"] == pytest.approx(
            _formulas(_flat(grads, None))["gsnr"], rel=tol
        )
        for module in ("first", "twice", "a", "head"):
            expected = _formulas(_flat(grads, module))["gsnr"]
            assert rec.diagnostics_by_module["gsnr"][module] == pytest.approx(expected, rel=tol)
    assert len(seen_v) == (2 if tic else 0)
    for v, grads in zip(seen_v, refs):
        for n, t in grads.items():
            torch.testing.assert_close(v[n].double(), t.square().sum(0), rtol=tol, atol=0)


def test_layers_whose_statistics_are_scaled_at_the_end() -> None:
    """At batch 64 a narrow Linear's statistics are smaller than its output gradient: the engine
    keeps them unscaled until its finish, so gsnr cannot be taken in the leaf hook from them."""
    model = _mlp()
    refs = []
    with GradientMonitor(model, diagnostics=_NAMES) as monitor:
        for step in range(2):
            x, y = _data(model, step, b=64)
            refs.append(_ref(_mlp, model, x, y))
            model.zero_grad()
            _loss(model(x), y).backward()
    _check_history(monitor, refs, model)


def test_a_gradient_penalty_step_is_nan_with_one_warning() -> None:
    """A lazy R1-style step (its own forward, autograd.grad with create_graph=True, then
    backward) runs two backward passes: its per-sample diagnostics are NaN, with one warning,
    and the plain steps around it still equal their formulas."""
    model = _mlp()
    refs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, diagnostics=(*_NAMES, "alpha")) as monitor:
            for step in range(5):
                x, y = _data(model, step)
                if step in (1, 3):
                    x = x.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
                    model.zero_grad()
                    g.square().sum(1).mean().backward()
                    continue
                refs.append(_ref(_mlp, model, x, y))
                model.zero_grad()
                _loss(model(x), y).backward()
            history = list(monitor.history)
    second = [w for w in caught if "second backward pass" in str(w.message)]
    assert len(second) == 1 and second[0].category is RuntimeWarning
    assert len(history) == 7  # the penalty steps are two passes each
    plain = [history[0], history[3], history[6]]
    for rec in history[1:3] + history[4:6]:
        assert all(math.isnan(rec.diagnostics[n]) for n in (*_NAMES, "alpha"))
    for rec, grads in zip(plain, refs):
        expected = _formulas(_flat(grads, None))
        for name in _NAMES:
            assert rec.diagnostics[name] == pytest.approx(expected[name], rel=_TOL), name
