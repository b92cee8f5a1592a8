"""gradlab.curvature against the dense Hessian of small models (torch.func.hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlab as gl


def _setup(device, train: bool = False):
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
        .double()
        .to(device)
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train(train)
    x = torch.randn(16, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 2, (16,), device=device)

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    # dense reference: the same loss as a function of a flat parameter vector
    fm = gl.functional(model, batchnorm="batch-stats")
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def flat_loss(theta):
        pieces = torch.split(theta, sizes)
        params = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(fm(params, x), y)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    H = torch.func.hessian(flat_loss)(theta)
    return model, loss_fn, H


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def _assert_untouched(model, snap):
    state, flags = snap
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_exact_trace_and_diagonal(train, device):
    model, loss_fn, H = _setup(device, train)
    snap = _snapshot(model)
    mode = "train" if train else "eval"
    tr = gl.hessian_trace(loss_fn, model, method="exact", mode=mode)
    torch.testing.assert_close(tr, H.diagonal().sum())
    diag = gl.hessian_diagonal(loss_fn, model, method="exact", mode=mode)
    assert list(diag) == [n for n, _ in model.named_parameters()]
    flat = torch.cat([d.flatten() for d in diag.values()])
    torch.testing.assert_close(flat, H.diagonal())
    _assert_untouched(model, snap)
    # sequence and tensor params give tuples and tensors
    params = list(model.parameters())
    with gl.autotune(False):
        d_seq = gl.hessian_diagonal(loss_fn, params, method="exact", mode=None)
    assert isinstance(d_seq, tuple) and len(d_seq) == len(params)
    model.train(train)
    d_one = gl.hessian_diagonal(loss_fn, params[0], method="exact")
    assert isinstance(d_one, torch.Tensor) and d_one.shape == params[0].shape
    torch.testing.assert_close(d_one.flatten(), H.diagonal()[: params[0].numel()])


def test_eval_mode_is_used_for_a_train_mode_module(device):
    model, loss_fn, _ = _setup(device, train=True)
    _, _, H_eval = _setup(device, train=False)
    snap = _snapshot(model)
    torch.testing.assert_close(
        gl.hessian_trace(loss_fn, model, method="exact"), H_eval.diagonal().sum()
    )
    _assert_untouched(model, snap)
    assert model.training


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top3_eigenvalues_match_eigvalsh(method, device):
    model, loss_fn, H = _setup(device)
    evals = torch.linalg.eigvalsh(H)
    expected = evals[torch.argsort(evals.abs(), descending=True)[:3]]
    kw = {"max_iter": 2000, "tol": 1e-12} if method == "power" else {}
    res = gl.hessian_eigenvalues(loss_fn, model, k=3, method=method, generator=0, **kw)
    assert isinstance(res, gl.Eigenpairs) and res.values.shape == (3,)
    torch.testing.assert_close(res.values, expected, rtol=1e-4, atol=0)
    assert res.vectors.shape == (3, H.shape[0])
    for lam, vec in zip(res.values, res.vectors):
        torch.testing.assert_close(H @ vec, lam * vec, atol=1e-3 * lam.abs(), rtol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_stochastic_trace_within_10_percent(method, device):
    model, loss_fn, H = _setup(device)
    exact = H.diagonal().sum()
    est = gl.hessian_trace(loss_fn, model, samples=2000, method=method, generator=1)
    assert abs(est - exact) <= 0.1 * abs(exact)
    again = gl.hessian_trace(loss_fn, model, samples=2000, method=method, generator=1)
    torch.testing.assert_close(est, again, rtol=0, atol=0)  # reproducible with a seed


def test_hutch_plus_plus_is_exact_on_low_rank():
    # H = diag(w) with 3 non-zeros: the sketch captures it, so Hutch++ is exact
    w = torch.zeros(40, dtype=torch.float64)
    w[:3] = torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)
    p = torch.randn(40, dtype=torch.float64, requires_grad=True)
    est = gl.hessian_trace(lambda: 0.5 * (w * p**2).sum(), p, samples=30, method="hutch++")
    torch.testing.assert_close(est, w.sum())


def test_hutchinson_diagonal_converges(device):
    model, loss_fn, H = _setup(device)
    est = gl.hessian_diagonal(loss_fn, model, samples=2000, generator=2)
    flat = torch.cat([d.flatten() for d in est.values()])
    err = (flat - H.diagonal()).norm() / H.diagonal().norm()
    assert err < 0.15


def test_spectrum_density_integrates_to_one_and_mean_is_trace_over_n(device):
    model, loss_fn, H = _setup(device)
    n = H.shape[0]
    spec = gl.hessian_spectrum(loss_fn, model, probes=300, steps=8, generator=3)
    assert isinstance(spec, gl.Spectrum) and spec.grid.shape == spec.density.shape
    torch.testing.assert_close(
        torch.trapezoid(spec.density, spec.grid), torch.tensor(1.0, dtype=torch.float64)
    )
    assert bool((spec.density >= 0).all())
    torch.testing.assert_close(spec.weights.sum(1), torch.ones(300, dtype=torch.float64))
    mean = torch.trapezoid(spec.grid * spec.density, spec.grid)
    quadrature_mean = (spec.nodes * spec.weights).sum(1).mean()
    torch.testing.assert_close(mean, quadrature_mean, rtol=1e-6, atol=1e-8)
    trace = H.diagonal().sum()
    assert abs(mean - trace / n) <= 0.1 * abs(trace / n)
    # with full Lanczos the nodes of every probe lie in the true spectral range
    evals = torch.linalg.eigvalsh(H)
    full = gl.hessian_spectrum(loss_fn, model, probes=2, steps=n, generator=4)
    assert full.nodes.min() >= evals.min() - 1e-8 and full.nodes.max() <= evals.max() + 1e-8


def test_errors():
    w = torch.randn(3, requires_grad=True)

    def loss():
        return (w**4).sum()

    with pytest.raises(
        ValueError, match=r"hessian_trace: unknown method 'slq'; valid .*'hutch\+\+'"
    ):
        gl.hessian_trace(loss, w, method="slq")
    with pytest.raises(ValueError, match=r"hessian_trace: samples=0; pass an int >= 1"):
        gl.hessian_trace(loss, w, samples=0)
    with pytest.raises(ValueError, match=r"hessian_trace: samples=2; pass an int >= 3"):
        gl.hessian_trace(loss, w, samples=2, method="hutch++")
    with pytest.raises(ValueError, match=r"hessian_eigenvalues: k=4 but the Hessian is only 3x3"):
        gl.hessian_eigenvalues(loss, w, k=4)
    with pytest.raises(ValueError, match=r"hessian_diagonal: loss_fn must return a scalar"):
        gl.hessian_diagonal(lambda: w**2, w)
    with pytest.raises(ValueError, match=r"hessian_trace: params\[0\] .* does not require grad"):
        gl.hessian_trace(loss, torch.ones(3))
    with pytest.raises(TypeError, match=r"hessian_spectrum: generator is a str"):
        gl.hessian_spectrum(loss, w, generator="seed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hessian_trace: mode='test' is not one of"):
        gl.hessian_trace(loss, nn.Linear(2, 2), mode="test")
    with pytest.raises(gl.GraphError, match=r"hessian_trace: the loss does not depend on params"):
        gl.hessian_trace(lambda: torch.tensor(1.0), w)
    with pytest.raises(TypeError, match=r"hessian_trace: params is a str"):
        gl.hessian_trace(loss, "w")  # type: ignore[arg-type]


def test_under_no_grad_and_linear_part_gives_zero():
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    with torch.no_grad():
        diag = gl.hessian_diagonal(lambda: (w**3).sum() + v.sum(), [w, v], method="exact")
    torch.testing.assert_close(diag[0], 6 * w.detach())
    torch.testing.assert_close(diag[1], torch.zeros(2))
