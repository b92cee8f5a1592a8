"""PerSampleGradients against vmap(grad) of the per-sample loss (or a loop of autograd.grad where
vmap cannot run), float64 at 1e-10, for every statistic and every layer path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.per_sample import PerSampleGradients, _engine
from tests.per_sample._reference import dot_mean_of, dot_of, reference_grads, stats_of

ALL = ("norm", "grad", "sum_sq", "variance", "dot", "dot_mean")
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


# -- models -------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, (2, 3), padding="same", padding_mode="reflect", groups=4, bias=False),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    )


def group_norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


class Conv13(nn.Module):
    """Conv1d, Conv3d and transposed convolutions (closed forms) on one input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.t1 = nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c3 = nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1))
        self.t2 = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.out = nn.Linear(4 * 8 + 4 + 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        seq = x.reshape(b, 2, 64)
        h1 = self.t1(torch.tanh(self.c1(seq)))  # (b, 4, 64)
        h3 = self.c3(x.reshape(b, 2, 4, 4, 4)).mean((2, 3, 4))  # (b, 4)
        h2 = self.t2(x.reshape(b, 2, 8, 8)).mean((2, 3))  # (b, 3)
        feats = torch.cat([h1.reshape(b, 4, 8, 8).mean(-1).flatten(1), h3, h2], 1)
        return self.out(feats)


class Block(nn.Module):
    """Embedding, LayerNorm, MultiheadAttention (fallback), RMSNorm, Linear; output layer tied
    to the embedding; a LayerNorm used twice."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Linear(dim, dim)
        self.rms = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        q = self.ln(h)
        h = h + self.attn(q, q, q, need_weights=False)[0]
        h = h + torch.tanh(self.mlp(self.ln(h)))  # the LayerNorm's second call
        return self.head(self.rms(h))


class Recurrent(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=batch_first)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, (h, _) = self.lstm(x)
        return self.out(h[-1]) + self.out(out.mean(1 if self.batch_first else 0))


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def seq_loss_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


Case = tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, torch.Tensor]], bool]

CASES: dict[str, Case] = {
    "mlp": (mlp, lambda b: (torch.randn(b, 6), torch.randint(0, 3, (b,))), False),
    "cnn": (cnn, lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 3, (b,))), False),
    "conv1d_3d_transposed": (
        Conv13,
        lambda b: (torch.randn(b, 128), torch.randint(0, 3, (b,))),
        False,
    ),
    "group_norm_cnn": (
        group_norm_cnn,
        lambda b: (torch.randn(b, 3, 8, 8), torch.randint(0, 3, (b,))),
        False,
    ),
    "transformer_tied": (
        Block,
        lambda b: (torch.randint(0, 11, (b, 5)), torch.randint(0, 11, (b, 5))),
        False,
    ),
    "lstm": (Recurrent, lambda b: (torch.randn(b, 7, 4), torch.randint(0, 3, (b,))), True),
    "lstm_seq_first": (
        lambda: Recurrent(batch_first=False),
        lambda b: (torch.randn(b, 7, 4), torch.randint(0, 3, (b,))),
        True,
    ),
}


def _run(model: nn.Module, loss_fn, x, y, reduction: str, stats=ALL) -> PerSampleGradients:
    with PerSampleGradients(model, stats=stats, loss_reduction=reduction) as ps:
        loss_fn(model(x), y).backward()
    return ps


def _check(ps: PerSampleGradients, ref: dict[str, torch.Tensor], stats, tol) -> None:
    want = stats_of(ref)
    torch.testing.assert_close(ps.norm, want["norm"], **tol)
    torch.testing.assert_close(ps.norm_by_param, want["norm_by_param"], **tol)
    for stat in ("grad", "sum_sq", "variance"):
        if stat in stats:
            got = getattr(ps, stat)
            assert got.keys() == ref.keys()
            torch.testing.assert_close(got, want[stat], **tol)
    if "dot_mean" in stats:
        want_dm = dot_mean_of(ref)
        torch.testing.assert_close(ps.dot_mean_by_param, want_dm, **tol)
        torch.testing.assert_close(ps.dot_mean, sum(want_dm.values()), **tol)
    if "dot" in stats:
        v = {n: torch.randn_like(g[0]) for n, g in ref.items()}
        torch.testing.assert_close(ps.dot(v), dot_of(ref, v), **tol)
        by_param = {n: (ref[n] * v[n]).flatten(1).sum(1) for n in ref}
        torch.testing.assert_close(ps.dot_by_param(v), by_param, **tol)
        ps.close()


def _loss_for(name: str, reduction: str):
    seq = name.startswith("transformer")
    if reduction == "mean":
        return seq_loss if seq else F.cross_entropy
    return seq_loss_sum if seq else ce_sum


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "stats",
    [
        ALL,
        ("norm",),
        ("norm", "sum_sq", "variance"),
        ("norm", "dot_mean"),
        ("norm", "sum_sq", "dot_mean", "dot"),
    ],
    ids=["all", "norm", "moments", "dot_mean", "economy"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_vmap_grad_float64(name: str, stats, reduction: str, device) -> None:
    make, data, loop = CASES[name]
    model = make().double().to(device)
    x, y = data(5)
    x, y = (x.double() if x.is_floating_point() else x).to(device), y.to(device)
    loss_fn = _loss_for(name, reduction)
    ref = reference_grads(model, loss_fn, x, y, loop=loop)
    ps = _run(model, loss_fn, x, y, reduction, stats)
    _check(ps, ref, stats, TOL64)


@pytest.mark.parametrize(
    "stats",
    [ALL, ("norm",), ("norm", "sum_sq", "variance"), ("norm", "sum_sq", "dot_mean", "dot")],
    ids=["all", "norm", "moments", "economy"],
)
@pytest.mark.parametrize("name", ["mlp", "cnn", "group_norm_cnn", "transformer_tied", "lstm"])
def test_mean_loss_under_a_scaler_every_statistic(name: str, stats, device) -> None:
    """The engine brings each result to ``g_i`` (times ``B``, over the loss scale) by scaling
    whichever is smallest: the output gradient, the per-sample gradients formed, or the
    statistics a layer stores (scaled once after the backward: the convolutions here, whose
    output gradients outweigh their weights); ``dot`` scales its results. Every statistic
    against vmap(grad) of the unscaled per-sample loss."""
    make, data, loop = CASES[name]
    model = make().double().to(device)
    x, y = data(5)
    x, y = (x.double() if x.is_floating_point() else x).to(device), y.to(device)
    loss_fn = _loss_for(name, "mean")
    ref = reference_grads(model, loss_fn, x, y, loop=loop)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**7)
    with PerSampleGradients(model, stats=stats, scaler=scaler) as ps:
        scaler.scale(loss_fn(model(x), y)).backward()
    _check(ps, ref, stats, TOL64)


@pytest.mark.parametrize("pending", [0, 1 << 30], ids=["flushed_each", "flushed_once"])
@pytest.mark.parametrize(
    "stats",
    [("norm", "sum_sq", "variance", "dot_mean"), ("grad", "sum_sq", "dot_mean")],
    ids=["statistics", "with_grad"],
)
@pytest.mark.parametrize("name", ["cnn", "group_norm_cnn", "transformer_tied"])
def test_formed_gradients_reduced_together_or_one_by_one(
    name: str, stats, pending: int, monkeypatch
) -> None:
    """Per-sample gradients formed for statistics wait to be reduced with the others of their
    size; the same numbers whether the budget flushes them one at a time or all at the end."""
    monkeypatch.setattr(_engine, "_PENDING_BYTES", pending)
    make, data, loop = CASES[name]
    model = make().double()
    x, y = data(5)
    x = x.double() if x.is_floating_point() else x
    loss_fn = _loss_for(name, "mean")
    ref = reference_grads(model, loss_fn, x, y, loop=loop)
    _check(_run(model, loss_fn, x, y, "mean", stats), ref, stats, TOL64)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_tied", "lstm"])
def test_batch_of_one(name: str) -> None:
    make, data, loop = CASES[name]
    model = make().double()
    x, y = data(1)
    x = x.double() if x.is_floating_point() else x
    loss_fn = _loss_for(name, "mean")
    ps = _run(model, loss_fn, x, y, "mean")
    _check(ps, reference_grads(model, loss_fn, x, y, loop=loop), ALL, TOL64)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_tied"])
def test_float32_within_documented_tolerance(name: str) -> None:
    """float32: sums of O(P) products; rtol 1e-4 (100x float32's eps times the size of the
    sums), atol 1e-5 relative to O(1) gradients."""
    make, data, _ = CASES[name]
    model = make()
    x, y = data(8)
    loss_fn = _loss_for(name, "mean")
    ref = reference_grads(model.double(), loss_fn, x.double() if x.is_floating_point() else x, y)
    model.float()
    ps = _run(model, loss_fn, x, y, "mean")
    ref32 = {n: g.float() for n, g in ref.items()}
    _check(ps, ref32, ALL, {"rtol": 1e-4, "atol": 1e-5})


@pytest.mark.parametrize("name", list(CASES))
def test_grad_unchanged_and_no_hooks_left(name: str) -> None:
    make, data, _ = CASES[name]
    model = make().double()
    x, y = data(4)
    x = x.double() if x.is_floating_point() else x
    loss_fn = _loss_for(name, "mean")
    loss_fn(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    def count() -> int:
        hooks = 0
        for m in model.modules():
            hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
            hooks += len(m._backward_hooks)
        for p in model.parameters():
            hooks += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
            hooks += len(p._backward_hooks or {})
        return hooks

    before = count()
    with PerSampleGradients(model, stats=ALL) as ps:
        assert count() > before
        loss_fn(model(x), y).backward()
    assert count() == before
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n]), n
    ps.close()
    assert ps._records == [] and ps._replays == [] and ps._acc == {}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_tied", "lstm"])
def test_hooks_kept_between_entries_give_each_step_its_own_statistics(name: str) -> None:
    """_keep_installed (the monitor's mode, one entry per step): every entry's statistics equal
    the reference of its own step, a backward run outside the context leaves nothing behind, and
    _uninstall removes every hook."""
    make, data, loop = CASES[name]
    model = make().double()
    loss_fn = _loss_for(name, "mean")
    before = _hook_total(model)
    ps = PerSampleGradients(model, stats=ALL)
    ps._keep_installed()
    for step in range(3):
        torch.manual_seed(step)
        x, y = data(4)
        x = x.double() if x.is_floating_point() else x
        ref = reference_grads(model, loss_fn, x, y, loop=loop)
        with ps:
            loss_fn(model(x), y).backward()
        assert _hook_total(model) > before  # kept: inactive until the next entry
        loss_fn(model(x), y).backward()  # outside the context: not recorded
        _check(ps, ref, ALL, TOL64)
        ps.close()
    ps._uninstall()
    assert _hook_total(model) == before


def _hook_total(model: nn.Module) -> int:
    hooks = 0
    for m in model.modules():
        hooks += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        hooks += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        hooks += len(p._backward_hooks or {})
    return hooks


def test_module_called_twice_sums_before_the_norm() -> None:
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    # a loop: functional_call (torch 2.13) leaves a module that appears twice in the tree
    # with plain tensors instead of its parameters
    ref = reference_grads(model, F.cross_entropy, x, y, loop=True)
    ps = _run(model, F.cross_entropy, x, y, "mean")
    _check(ps, ref, ALL, TOL64)


def test_inplace_activation_after_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    ref = reference_grads(model, F.cross_entropy, x, y, loop=True)
    _check(_run(model, F.cross_entropy, x, y, "mean"), ref, ALL, TOL64)


def test_frozen_parameters_are_left_out() -> None:
    model = mlp().double()
    model[0].weight.requires_grad_(False)
    x, y = CASES["mlp"][1](5)
    x = x.double()
    ref = reference_grads(model, F.cross_entropy, x, y)
    ps = _run(model, F.cross_entropy, x, y, "mean")
    assert "0.weight" not in ps.norm_by_param and "0.bias" in ps.norm_by_param
    _check(ps, ref, ALL, TOL64)


def test_eval_batch_norm_goes_through_the_fallback() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    model = model.double()
    model(torch.randn(8, 3, 8, 8, dtype=torch.float64))  # running statistics
    model.eval()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 2, (5,))
    ref = reference_grads(model, F.cross_entropy, x, y)
    _check(_run(model, F.cross_entropy, x, y, "mean"), ref, ALL, TOL64)


def test_under_no_grad_the_forward_is_ignored() -> None:
    model = mlp().double()
    x, y = CASES["mlp"][1](5)
    x = x.double()
    with PerSampleGradients(model) as ps:
        with torch.no_grad():
            model(x)
        F.cross_entropy(model(x), y).backward()
    _check(ps, reference_grads(model, F.cross_entropy, x, y), ("norm",), TOL64)


class _ConvTwice(nn.Module):
    """One small convolution called twice: its per-sample gradients are summed over the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 12 * 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.conv(x).tanh()).flatten(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "stats", [("grad",), ("grad", "sum_sq", "variance", "dot_mean")], ids=["grad", "with_moments"]
)
@pytest.mark.parametrize("twice", [False, True], ids=["one_call", "called_twice"])
def test_gradients_smaller_than_the_output_gradient_scaled_after_the_rule(
    twice: bool, stats, reduction: str
) -> None:
    """A convolution of few weights over many positions: its per-sample gradients (``B x 38``)
    are smaller than its output gradient (``B x 2 x 12 x 12``), so the engine scales them, not
    the output gradient, to those of ``l_i``; the same numbers either way."""
    model = (
        _ConvTwice()
        if twice
        else nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 144, 3))
    ).double()
    x, y = torch.randn(5, 2, 12, 12, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_fn = F.cross_entropy if reduction == "mean" else ce_sum
    ref = reference_grads(model, loss_fn, x, y)
    _check(_run(model, loss_fn, x, y, reduction, stats), ref, stats, TOL64)
