"""gradlab.curvature._trace: hessian_trace and hessian_trace_by_block against the dense Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlab as gl
from tests.curvature._helpers import _assert_untouched, _setup, _snapshot


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


def test_errors():
    w = torch.randn(3, requires_grad=True)

    def loss():
        return (w**4).sum()

    with pytest.raises(
        ValueError,
        match=r"hessian_trace: method must be one of 'hutchinson', 'hutch\+\+', 'exact', got 'slq'",
    ):
        gl.hessian_trace(loss, w, method="slq")
    with pytest.raises(ValueError, match=r"hessian_trace: samples must be an int >= 1, got 0"):
        gl.hessian_trace(loss, w, samples=0)
    with pytest.raises(ValueError, match=r"hessian_trace: samples must be an int >= 3, got 2"):
        gl.hessian_trace(loss, w, samples=2, method="hutch++")
    with pytest.raises(ValueError, match=r"hessian_eigenvalues: k=4 but the operator is only 3x3"):
        gl.hessian_eigenvalues(loss, w, k=4)
    with pytest.raises(ValueError, match=r"hessian_diagonal: loss_fn must return a scalar"):
        gl.hessian_diagonal(lambda: w**2, w)
    with pytest.raises(
        ValueError,
        match=r"hessian_trace: params must be a tensor that requires grad, got tensor\(.*\)\. "
        r"Call \.requires_grad_\(\)",
    ):
        gl.hessian_trace(loss, torch.ones(3))
    with pytest.raises(
        TypeError,
        match=r"hessian_spectrum: generator must be a torch.Generator, an int seed or None, got",
    ):
        gl.hessian_spectrum(loss, w, generator="seed")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"hessian_trace: mode must be one of 'eval', 'train', None, got 'test'"
    ):
        gl.hessian_trace(loss, nn.Linear(2, 2), mode="test")
    with pytest.raises(gl.GraphError, match=r"hessian_trace: the loss does not depend on params"):
        gl.hessian_trace(lambda: torch.tensor(1.0), w)
    with pytest.raises(
        TypeError,
        match=r"hessian_trace: params must be a tensor, a sequence of tensors or an nn.Module, "
        r"got '",
    ):
        gl.hessian_trace(loss, "w")  # type: ignore[arg-type]


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
    blocks = dict(model.named_children())  # "2" is the Tanh: no parameters, skipped (warned)
    with pytest.warns(UserWarning, match=r"skipped block\(s\) '2' \(Tanh\)"):
        tr = gl.hessian_trace_by_block(loss_fn, blocks, method="exact", mode=mode)
    assert list(tr) == ["0", "1", "3"]
    for name, value in tr.items():
        torch.testing.assert_close(value, H[by_child[name], by_child[name]].trace())
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
    with pytest.raises(
        TypeError,
        match=rf"{fn}: block 'w': params must be a tensor, a sequence of tensors or an "
        r"nn.Module, got 3",
    ):
        gl.hessian_trace_by_block(loss, {"w": 3})  # type: ignore[dict-item]
    with pytest.raises(
        ValueError, match=rf"{fn}: block 'x': params must be a tensor that requires grad"
    ):
        gl.hessian_trace_by_block(loss, {"w": w, "x": torch.ones(2)})
    with pytest.raises(TypeError, match=rf"{fn}: blocks has a key 0; block names must be str"):
        gl.hessian_trace_by_block(loss, {0: w})  # type: ignore[dict-item]
    with pytest.raises(
        ValueError,
        match=rf"{fn}: blocks must hold parameters with requires_grad, got only blocks without any",
    ):
        gl.hessian_trace_by_block(loss, {"act": nn.Tanh()})
    with pytest.raises(
        ValueError, match=rf"{fn}: method must be one of 'hutchinson', 'exact', got 'hutch\+\+'"
    ):
        gl.hessian_trace_by_block(loss, {"w": w}, method="hutch++")
    with pytest.raises(ValueError, match=rf"{fn}: samples must be an int >= 1, got 0"):
        gl.hessian_trace_by_block(loss, {"w": w}, samples=0)
    with pytest.raises(
        ValueError, match=rf"{fn}: mode must be one of 'eval', 'train', None, got 'test'"
    ):
        gl.hessian_trace_by_block(loss, {"w": w}, mode="test")


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
