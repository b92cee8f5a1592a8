"""gradlab.curvature against the dense Hessian of small models (torch.func.hessian)."""

from __future__ import annotations

import itertools

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


# --------------------------------------------------------------------------------------------
# per-block traces


def _block_slices(model):
    """Flat index ranges of each child module and each parameter, in named_parameters order."""
    by_param, by_child, start = {}, {}, 0
    for name, p in model.named_parameters():
        by_param[name] = slice(start, start + p.numel())
        child = name.split(".")[0]
        lo = by_child[child].start if child in by_child else start
        by_child[child] = slice(lo, start + p.numel())
        start += p.numel()
    return by_param, by_child


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_exact_trace_by_block_matches_dense_diagonal_blocks(train, device):
    model, loss_fn, H = _setup(device, train)
    snap = _snapshot(model)
    mode = "train" if train else "eval"
    by_param, by_child = _block_slices(model)
    blocks = dict(model.named_children())  # "2" is the Tanh: an empty block
    tr = gl.hessian_trace_by_block(loss_fn, blocks, method="exact", mode=mode)
    assert list(tr) == ["0", "1", "2", "3"]
    for name, value in tr.items():
        expected = H[by_child[name], by_child[name]].trace() if name in by_child else 0.0
        torch.testing.assert_close(value, torch.as_tensor(expected, dtype=H.dtype, device=device))
    torch.testing.assert_close(sum(tr.values()), H.trace())
    # a module: one block per parameter, keyed by parameter name
    per_param = gl.hessian_trace_by_block(loss_fn, model, method="exact", mode=mode)
    assert list(per_param) == list(by_param)
    for name, value in per_param.items():
        torch.testing.assert_close(value, H[by_param[name], by_param[name]].trace())
    _assert_untouched(model, snap)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_hutchinson_trace_by_block_within_10_percent(train, device):
    model, loss_fn, H = _setup(device, train)
    mode = "train" if train else "eval"
    _, by_child = _block_slices(model)
    blocks = {"first": model[0], "bn": model[1], "last": [model[3].weight, model[3].bias]}
    est = gl.hessian_trace_by_block(loss_fn, blocks, samples=2000, generator=5, mode=mode)
    assert list(est) == ["first", "bn", "last"]
    for name, child in [("first", "0"), ("bn", "1"), ("last", "3")]:
        B = H[by_child[child], by_child[child]]
        exact = B.trace()
        # standard error of Hutchinson with restricted Rademacher probes
        se = (2 * (B.norm() ** 2 - (B.diagonal() ** 2).sum()) / 2000).sqrt()
        assert abs(est[name] - exact) <= 4 * se, (name, est[name], exact, se)
        if train or name != "first":
            # in eval mode the first layer's block trace is -0.0045 with a standard error of
            # 0.006 at 2000 probes: no estimator gets within 10% of it there
            assert abs(est[name] - exact) <= 0.1 * abs(exact), (name, est[name], exact)
    again = gl.hessian_trace_by_block(loss_fn, blocks, samples=2000, generator=5, mode=mode)
    assert all(bool(est[k] == again[k]) for k in est)  # reproducible with a seed


def test_trace_by_block_probes_are_restricted_to_the_block():
    # H_aa = diag(c) and a strong coupling H_ab = 3: probes restricted to a block see only
    # z^T diag(c) z = sum(c) (z_i^2 = 1), so even 3 probes are exact; full-length probes would
    # pick up the coupling z_a^T H_ab z_b and miss by far.
    c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return 0.5 * (c * a**2).sum() + 3 * a.sum() * b.sum() + (b**2).sum()

    tr = gl.hessian_trace_by_block(loss_fn, {"a": a, "b": b}, samples=3, generator=0)
    torch.testing.assert_close(tr["a"], c.sum())
    torch.testing.assert_close(tr["b"], torch.tensor(10.0, dtype=torch.float64))


def test_trace_by_block_errors():
    w = torch.randn(3, requires_grad=True)

    def loss():
        return (w**4).sum()

    fn = "hessian_trace_by_block"
    with pytest.raises(TypeError, match=rf"{fn}: blocks is a list; pass a dict name -> tensor"):
        gl.hessian_trace_by_block(loss, [w])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{fn}: blocks is an empty dict"):
        gl.hessian_trace_by_block(loss, {})
    with pytest.raises(TypeError, match=rf"{fn}: block 'w': params is a int"):
        gl.hessian_trace_by_block(loss, {"w": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=rf"{fn}: block 'x': params\[0\] .* does not require"):
        gl.hessian_trace_by_block(loss, {"w": w, "x": torch.ones(2)})
    with pytest.raises(TypeError, match=rf"{fn}: blocks has a key 0; block names must be str"):
        gl.hessian_trace_by_block(loss, {0: w})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=rf"{fn}: no block has parameters with requires_grad"):
        gl.hessian_trace_by_block(loss, {"act": nn.Tanh()})
    with pytest.raises(ValueError, match=rf"{fn}: unknown method 'hutch\+\+'; valid methods"):
        gl.hessian_trace_by_block(loss, {"w": w}, method="hutch++")
    with pytest.raises(ValueError, match=rf"{fn}: samples=0; pass an int >= 1"):
        gl.hessian_trace_by_block(loss, {"w": w}, samples=0)
    with pytest.raises(ValueError, match=rf"{fn}: mode='test' is not one of"):
        gl.hessian_trace_by_block(loss, {"w": w}, mode="test")


# --------------------------------------------------------------------------------------------
# progress


def test_progress_true_prints_one_updating_line_to_stderr(capsys, device):
    model, loss_fn, _ = _setup(device)
    quiet = gl.hessian_trace(loss_fn, model, samples=200, generator=0)
    assert capsys.readouterr().err == ""  # silent by default
    loud = gl.hessian_trace(loss_fn, model, samples=200, generator=0, progress=True)
    torch.testing.assert_close(loud, quiet, rtol=0, atol=0)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("\rhessian_trace: 0/200 Hessian-vector products, ")
    assert err.endswith("\n") and err.count("\n") == 1  # one line, rewritten with \r
    final = err.split("\r")[-1]
    assert final.startswith("hessian_trace: 200/200 Hessian-vector products, ")
    assert final.rstrip().endswith(" s") and "ETA" not in final


def test_progress_is_throttled(capsys, monkeypatch):
    from gradlab.curvature import _progress as curvature

    clock = [0.0]
    monkeypatch.setattr(curvature.time, "perf_counter", lambda: clock[0])
    prog = curvature.Progress("f", True)
    with prog.run(1000):
        for _ in range(1000):
            clock[0] += 0.001  # 1000 products in one simulated second
            prog.advance(1)
    err = capsys.readouterr().err
    # the first line, about ten updates in the second, and the final line
    assert 10 <= err.count("\r") <= 13, err.count("\r")
    assert err.split("\r")[-1].startswith("f: 1000/1000 Hessian-vector products, 1.0 s")


def _run_each(name, loss_fn, model, progress):
    calls = {
        "trace": lambda: gl.hessian_trace(loss_fn, model, samples=50, progress=progress),
        "trace-exact": lambda: gl.hessian_trace(loss_fn, model, method="exact", progress=progress),
        "hutch++": lambda: gl.hessian_trace(
            loss_fn, model, samples=30, method="hutch++", progress=progress
        ),
        "diagonal": lambda: gl.hessian_diagonal(loss_fn, model, samples=40, progress=progress),
        "lanczos": lambda: gl.hessian_eigenvalues(loss_fn, model, k=2, progress=progress),
        "power": lambda: gl.hessian_eigenvalues(
            loss_fn, model, k=2, method="power", max_iter=30, progress=progress
        ),
        "spectrum": lambda: gl.hessian_spectrum(
            loss_fn, model, probes=3, steps=10, progress=progress
        ),
        "by-block": lambda: gl.hessian_trace_by_block(
            loss_fn, dict(model.named_children()), samples=20, progress=progress
        ),
    }
    return calls[name]()


# expected total products, from the model's n = 4*6+6 + 6+6 + 6*2+2 = 56 parameters
_TOTALS = {
    "trace": 50,
    "trace-exact": 56,
    "hutch++": 30,
    "diagonal": 40,
    "lanczos": None,  # stops early: ends at (done, done) with done <= min(100, n)
    "power": None,
    "spectrum": 30,
    "by-block": 60,  # 3 blocks with parameters (the Tanh is empty) x 20 probes
}


@pytest.mark.parametrize("name", list(_TOTALS))
def test_progress_callable_gets_increasing_counts_ending_at_total(name, capsys, device):
    model, loss_fn, _ = _setup(device)
    seen: list[tuple[int, int]] = []
    _run_each(name, loss_fn, model, lambda done, total: seen.append((done, total)))
    assert capsys.readouterr().err == ""  # a callable replaces the status line
    assert seen, "the callable was never called"
    assert seen[-1][0] == seen[-1][1]
    expected = _TOTALS[name]
    if expected is not None:
        dones = [d for d, _ in seen]
        assert all(a < b for a, b in itertools.pairwise(dones)), dones
        assert seen[-1] == (expected, expected)
        assert all(t == expected for _, t in seen)
    else:  # early stop: counts up to the budget, then one last call (done, done)
        budget = 56 if name == "lanczos" else 2 * 30
        dones = [d for d, _ in seen[:-1]]
        assert all(a < b for a, b in itertools.pairwise(dones)), dones
        assert all(t == budget for _, t in seen[:-1])
        assert seen[-1] == (dones[-1], dones[-1]) and dones[-1] < budget


@pytest.mark.parametrize("bad", [1, "yes", None], ids=["int", "str", "none"])
def test_progress_bad_type(bad):
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(
        TypeError, match=r"hessian_spectrum: progress is a \w+; pass True .*callable progress"
    ):
        gl.hessian_spectrum(lambda: (w**4).sum(), w, progress=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"hessian_trace_by_block: progress is a"):
        gl.hessian_trace_by_block(lambda: (w**4).sum(), {"w": w}, progress=bad)  # type: ignore[arg-type]


def test_progress_line_is_ended_when_the_run_fails(capsys):
    from gradlab.curvature import _progress as curvature

    prog = curvature.Progress("f", True)
    with pytest.raises(RuntimeError, match="boom"), prog.run(10):
        prog.advance(3)
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1  # the shell prompt starts on a new line


def test_trace_by_block_overlapping_blocks_each_count_the_shared_parameter():
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return (a**4).sum() + (a.sum() * b).pow(2).sum()

    H = torch.func.hessian(lambda t: (t[:3] ** 4).sum() + (t[:3].sum() * t[3:]).pow(2).sum())(
        torch.cat([a, b]).detach()
    )
    tr = gl.hessian_trace_by_block(loss_fn, {"all": [a, b], "a": a, "b": (b,)}, method="exact")
    torch.testing.assert_close(tr["all"], H.trace())
    torch.testing.assert_close(tr["a"], H[:3, :3].trace())
    torch.testing.assert_close(tr["b"], H[3:, 3:].trace())
