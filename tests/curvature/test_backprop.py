"""Exact Hessian diagonal by Hessian backpropagation against the dense Hessian (torch.func)."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradlab as gl
from gradlab.curvature import _backprop
from gradlab.curvature._backprop import exact_diagonal
from tests.curvature._helpers import count_products

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu-inplace": lambda: nn.ReLU(inplace=True),
    "leaky-relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu-inplace": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}


def _losses(N: int, C: int, device: torch.device) -> dict[str, object]:
    y = torch.randint(0, C, (N,), device=device)
    t = torch.randn(N, C, dtype=torch.float64, device=device)
    return {
        "ce-mean": lambda o: F.cross_entropy(o, y),
        "ce-sum": lambda o: F.cross_entropy(o, y, reduction="sum"),
        "mse-mean": lambda o: F.mse_loss(o, t),
        "mse-sum": lambda o: F.mse_loss(o, t, reduction="sum"),
    }


def _dense_diagonal(model: nn.Module, loss_of_out, x: torch.Tensor, names=None):
    """Diagonal of the dense Hessian of loss_of_out(model(x)) w.r.t. the named parameters."""
    params = dict(model.named_parameters())
    names = names or list(params)

    def f(*ps):
        return loss_of_out(torch.func.functional_call(model, {**params, **dict(zip(names, ps))}, x))

    ps = tuple(params[n].detach() for n in names)
    H = torch.func.hessian(f, argnums=tuple(range(len(ps))))(*ps)
    return [
        H[i][i].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape) for i, p in enumerate(ps)
    ]


def _mlp(widths, act, bias=True):
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b, bias=bias), act()]
    return nn.Sequential(*layers[:-1]).double()


def _assert_equal(got, ref, tol=1e-10):
    assert got is not None, "the fast path refused a supported structure"
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=0, atol=tol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", ["ce-mean", "ce-sum", "mse-mean", "mse-sum"])
def test_equals_dense_hessian_diagonal(act, loss, device):
    # widths 5-7-6-3: the curvature is kept factored at one layer and full at the next
    bias = loss != "ce-sum"  # both with and without biases
    model = _mlp([5, 7, 6, 3], ACTIVATIONS[act], bias).to(device)
    x = torch.randn(11, 5, dtype=torch.float64, device=device)
    lo = _losses(11, 3, device)[loss]
    got = exact_diagonal(lambda: lo(model(x)), list(model.parameters()))
    _assert_equal(got, _dense_diagonal(model, lo, x))


@pytest.mark.parametrize("widths", [[4, 30, 30, 2], [30, 3, 3, 3, 3], [6, 8, 40, 8, 4]])
def test_factored_full_and_chunked_paths_agree(widths, monkeypatch):
    model = _mlp(widths, nn.Tanh)
    x = torch.randn(9, widths[0], dtype=torch.float64)
    lo = _losses(9, widths[-1], torch.device("cpu"))["ce-mean"]
    ref = _dense_diagonal(model, lo, x)
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    monkeypatch.setattr(_backprop, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    # every representation of the curvature is exercised: force the factored one, then the full
    width_after = _backprop._Curvature.width_after
    for forced in (lambda self: 0, lambda self: 10**9):
        monkeypatch.setattr(_backprop._Curvature, "width_after", forced)
        _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    monkeypatch.setattr(_backprop._Curvature, "width_after", width_after)


def test_subset_of_parameters_and_frozen_layers():
    model = _mlp([4, 6, 5, 3], nn.Sigmoid)
    model[0].requires_grad_(False)  # frozen first layer: before the chain
    x = torch.randn(7, 4, dtype=torch.float64)
    lo = _losses(7, 3, torch.device("cpu"))["ce-mean"]
    names = ["2.weight"]  # the middle weight only; the last layer is a constant
    got = exact_diagonal(lambda: lo(model(x)), [model[2].weight])
    _assert_equal(got, _dense_diagonal(model, lo, x, names))
    got = exact_diagonal(lambda: lo(model(x)), [model[4].bias, model[2].bias])  # any order
    _assert_equal(got, _dense_diagonal(model, lo, x, ["4.bias", "2.bias"]))


def test_leading_dimensions_are_samples_and_output_activation():
    # tokens (N, T, F) through the MLP, cross-entropy over all tokens
    model = _mlp([3, 5, 4], nn.GELU)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))

    def lo(o):
        return F.cross_entropy(o.reshape(-1, 4), y)

    _assert_equal(
        exact_diagonal(lambda: lo(model(x)), list(model.parameters())),
        _dense_diagonal(model, lo, x),
    )
    # a Sigmoid after the last layer, binary cross-entropy and a scale on the loss
    net = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2), nn.Sigmoid()).double()
    t = torch.rand(8, 2, dtype=torch.float64)
    xb = torch.randn(8, 3, dtype=torch.float64)

    def bce(o):
        return 0.5 * F.binary_cross_entropy(o, t)

    _assert_equal(
        exact_diagonal(lambda: bce(net(xb)), list(net.parameters())), _dense_diagonal(net, bce, xb)
    )


@pytest.mark.parametrize(
    "act,padding,stride,dilation",
    [("relu", 0, 1, 1), ("tanh", 1, 2, 1), ("sigmoid-inplace", 2, 1, 2), ("silu", "valid", 1, 1)],
)
def test_convolutions_equal_dense_hessian_diagonal(act, padding, stride, dilation, monkeypatch):
    Act = {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid-inplace": lambda: nn.ELU(inplace=True),
        "silu": nn.SiLU,
    }[act]
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=padding, stride=stride, dilation=dilation)
    model = nn.Sequential(conv, Act(), nn.Conv2d(3, 2, 2), Act(), nn.Flatten(), nn.LazyLinear(3))
    model = model.double()
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    lo = _losses(5, 3, torch.device("cpu"))["ce-mean"]
    ref = _dense_diagonal(model, lo, x)
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    monkeypatch.setattr(_backprop, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    # the loss on the convolution's output itself (a sample: an image), one layer listed
    mse = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Conv2d(2, 1, 2)).double()
    t = torch.randn(5, 1, 3, 3, dtype=torch.float64)

    def lo2(o):
        return F.mse_loss(o, t)

    got = exact_diagonal(lambda: lo2(mse(x[..., :6, :6])), [mse[0].weight, mse[0].bias])
    _assert_equal(got, _dense_diagonal(mse, lo2, x[..., :6, :6], ["0.weight", "0.bias"]))


_POOLS = {
    "max-overlapping-padded": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "max-dilated-ceil": lambda: nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=True),
    "avg": lambda: nn.AvgPool2d(2),
    "avg-padded-exclude-ceil": lambda: nn.AvgPool2d(
        3, stride=2, padding=1, ceil_mode=True, count_include_pad=False
    ),
    "avg-divisor": lambda: nn.AvgPool2d(2, stride=1, divisor_override=3),
    "adaptive-avg": lambda: nn.AdaptiveAvgPool2d((3, 2)),
    "adaptive-max": lambda: nn.AdaptiveMaxPool2d(3),
}


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("pool", list(_POOLS))
def test_pooling_equals_dense_hessian_diagonal(pool, act, monkeypatch, device):
    # conv (stride 2, padding) -> act -> pool -> act -> conv -> flatten -> linear: tanh puts a
    # residual term before the pooling, which its transposed map then carries
    Act = {"relu": nn.ReLU, "tanh": nn.Tanh}[act]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        Act(),
        _POOLS[pool](),
        Act(),
        nn.Conv2d(3, 2, 1),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    model = model.to(device)
    x = torch.randn(5, 2, 11, 11, dtype=torch.float64, device=device)
    model(x)  # materialise the lazy layer
    lo = _losses(5, 3, device)["ce-mean"]
    ref = _dense_diagonal(model, lo, x)
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    monkeypatch.setattr(_backprop, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    # the pooling's own full and factored maps (forced), with an MSE loss (no square root)
    mse = _losses(5, 3, device)["mse-sum"]
    ref = _dense_diagonal(model, mse, x)
    for forced in (lambda self: 0, lambda self: 10**9):
        monkeypatch.setattr(_backprop._Curvature, "width_after", forced)
        _assert_equal(exact_diagonal(lambda: mse(model(x)), list(model.parameters())), ref)


def test_pooling_first_and_last_in_the_chain_and_returning_indices():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    # pooling before the first layer (outside the chain) and on the chain's output
    model = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(1, 2, 2), nn.Sigmoid(), nn.AvgPool2d(2)
    ).double()
    t = torch.randn(4, 2, 1, 1, dtype=torch.float64)

    def lo(o):
        return F.mse_loss(o, t)

    _assert_equal(
        exact_diagonal(lambda: lo(model(x)), list(model.parameters())),
        _dense_diagonal(model, lo, x),
    )
    # a max pooling that returns its indices (a tuple) is not a chain module: it becomes part
    # of the loss, whose per-sample Hessian autograd then finds
    indices = nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2, return_indices=True)).double()

    def lo2(o):
        return o[0].square().sum()

    _assert_equal(
        exact_diagonal(lambda: lo2(indices(x)), list(indices.parameters())),
        _dense_diagonal(indices, lo2, x),
    )


class _SharedPool(nn.Module):  # one pooling and one activation module, each called twice
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 3, 3)
        self.pool, self.act = nn.MaxPool2d(2), nn.Tanh()
        self.flat, self.fc = nn.Flatten(), nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        x = self.pool(self.act(self.c1(x)))
        return self.fc(self.flat(self.pool(self.act(self.c2(x)))))


def test_pooling_module_called_twice(device):
    torch.manual_seed(0)
    model = _SharedPool().double().to(device)
    x = torch.randn(5, 1, 14, 14, dtype=torch.float64, device=device)
    lo = _losses(5, 4, device)["ce-mean"]
    _assert_equal(
        exact_diagonal(lambda: lo(model(x)), list(model.parameters())),
        _dense_diagonal(model, lo, x),
    )


def test_pooling_does_not_run_the_users_hooks():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    ).double()
    calls = []
    handle = model[2].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    lo = _losses(3, 2, torch.device("cpu"))["ce-sum"]
    try:
        got = exact_diagonal(lambda: lo(model(x)), list(model.parameters()))
    finally:
        handle.remove()
    assert calls == [1]  # the forward pass only
    _assert_equal(got, _dense_diagonal(model, lo, x))


class _Functional(nn.Module):  # activations as functions, one activation module reused
    def __init__(self, name: str) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.act = nn.Softplus()
        self.f = {
            "relu": torch.relu,
            "tanh": torch.tanh,
            "sigmoid": torch.sigmoid,
            "silu": F.silu,
            "gelu-tanh": lambda t: F.gelu(t, approximate="tanh"),
            "leaky-relu": lambda t: F.leaky_relu(t, 0.3),
        }[name]

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.f(self.a(x))))))


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "silu", "gelu-tanh", "leaky-relu"])
def test_functional_activations_and_a_reused_module(name):
    model = _Functional(name).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    lo = _losses(7, 3, torch.device("cpu"))["ce-mean"]
    got = exact_diagonal(lambda: lo(model(x)), list(model.parameters()))
    _assert_equal(got, _dense_diagonal(model, lo, x))


def test_dropout_in_eval_and_identity_in_the_chain():
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Identity(), nn.Linear(5, 3)
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    lo = _losses(6, 3, torch.device("cpu"))["mse-mean"]
    model.eval()
    got = exact_diagonal(lambda: lo(model(x)), list(model.parameters()))
    _assert_equal(got, _dense_diagonal(model, lo, x))
    model.train()  # random masks: not on the fast path
    assert exact_diagonal(lambda: lo(model(x)), list(model.parameters())) is None


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "sum"}, {"weight": "w"}, {"ignore_index": 1}, {"label_smoothing": 0.1}],
    ids=["mean", "sum", "class-weights", "ignore-index", "label-smoothing"],
)
def test_cross_entropy_variants(kwargs, monkeypatch):
    model = _mlp([4, 6, 3], nn.Tanh)
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0])
    if kwargs.get("weight") == "w":
        kwargs = {"weight": torch.tensor([0.3, 1.2, 0.7], dtype=torch.float64)}
    loss = nn.CrossEntropyLoss(**kwargs)

    def lo(o):
        return loss(o, y)

    ref = _dense_diagonal(model, lo, x)
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    # the closed form (all but label smoothing) and autograd's loss Hessian agree
    monkeypatch.setattr(_backprop, "_cross_entropy_hessian", lambda *a: None)
    _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + torch.tanh(self.a(x)))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Scaled(nn.Module):  # a parameter used outside the supported modules, inside the chain
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.s = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.b(self.s * torch.tanh(self.a(x)))


class _Keeps(nn.Module):  # keeps its hidden activation, which the loss then uses
    instance: _Keeps

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.Tanh()

    def forward(self, x):
        self.h = self.act(self.a(x))
        return self.b(self.h)


_Keeps.instance = _Keeps()


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(h) + self.c(h)


def _unsupported_cases():
    x = torch.randn(6, 4)
    y = torch.randint(0, 2, (6,))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    bn_frozen = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    bn_frozen[1].requires_grad_(False)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    tied[2].weight = tied[0].weight
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(4, 2))
    other = nn.Linear(4, 2)

    def ce(m, inp=x):
        return lambda: F.cross_entropy(m(inp), y)

    return {
        "residual": (ce(_Residual()), _Residual),
        "batchnorm-train": (ce(bn), bn),
        "batchnorm-frozen": (
            ce(bn_frozen),
            lambda: [p for p in bn_frozen.parameters() if p.requires_grad],
        ),
        "shared-weight": (ce(_Shared()), _Shared),
        "tied-weights": (ce(tied), tied),
        "param-outside-modules": (ce(_Scaled()), _Scaled),
        "two-heads": (ce(_TwoHeads()), _TwoHeads),
        "conv1d": (ce(conv, x.unsqueeze(1)), conv),
        "grouped-conv2d": (ce(grouped, x.reshape(6, 2, 2, 1)), grouped),
        "non-separable": (lambda: mlp(x).sum() ** 2, mlp),
        "batch-coupled": (lambda: mlp(x).var(0).sum(), mlp),
        "weakly-batch-coupled": (  # a coupling far below the loss's own curvature
            lambda: (lambda o: F.cross_entropy(o, y) + 1e-9 * o.mean(0).square().sum())(mlp(x)),
            mlp,
        ),
        "weight-decay": (lambda: F.cross_entropy(mlp(x), y) + mlp[0].weight.square().sum(), mlp),
        "module-called-twice": (lambda: F.cross_entropy(mlp(x), y) + mlp[0](x).sum(), mlp),
        "uses-intermediate": (
            lambda: F.cross_entropy(_Keeps.instance(x), y) + _Keeps.instance.h.sum(),
            lambda: list(_Keeps.instance.parameters()),
        ),
        "unused-param": (ce(mlp), lambda: [*mlp.parameters(), other.weight]),
        "no-params-used": (ce(other), mlp),
        "input-depends-on-params": (
            lambda: F.cross_entropy(mlp(F.linear(x, mlp[0].weight)), y),
            mlp,
        ),
    }


_UNSUPPORTED = _unsupported_cases()


@pytest.mark.parametrize("case", list(_UNSUPPORTED))
def test_unsupported_structure_returns_none_and_falls_back(case):
    torch.manual_seed(0)
    loss_fn, model = _UNSUPPORTED[case]
    if isinstance(model, type):  # a module class: build one and bind the closure to it
        module = model()
        x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
        loss_fn = lambda: F.cross_entropy(module(x), y)
        params = list(module.parameters())
    elif isinstance(model, nn.Module):
        params = list(model.parameters())
    else:
        params = model()
    assert exact_diagonal(loss_fn, params) is None


def test_refuses_non_leaf_and_duplicate_params():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    assert exact_diagonal(lambda: model(x).square().sum(), [model[0].weight * 1]) is None
    assert exact_diagonal(lambda: model(x).square().sum(), [model[0].weight] * 2) is None


def _hook_counts():
    from torch.nn.modules import module as m

    return len(m._global_forward_hooks), len(m._global_forward_pre_hooks)


def test_leaves_no_hooks_grads_or_versions_behind():
    model = _mlp([3, 4, 2], nn.Tanh)
    x = torch.randn(5, 3, dtype=torch.float64)
    before = _hook_counts()
    versions = [p._version for p in model.parameters()]
    rng = torch.get_rng_state()
    assert exact_diagonal(lambda: model(x).square().mean(), list(model.parameters())) is not None
    assert _hook_counts() == before
    assert all(p.grad is None for p in model.parameters())
    assert [p._version for p in model.parameters()] == versions
    assert torch.equal(torch.get_rng_state(), rng)

    def boom():
        model(x)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # the user's error, and still no hooks left
        exact_diagonal(boom, list(model.parameters()))
    assert _hook_counts() == before


def test_user_backward_hooks_and_pending_graph_are_kept():
    model = _mlp([3, 5, 2], nn.Sigmoid)
    seen = []
    handle = model[0].register_full_backward_hook(lambda m, gi, go: seen.append(1))
    x = torch.randn(6, 3, dtype=torch.float64)
    lo = _losses(6, 2, torch.device("cpu"))["mse-mean"]
    pending = lo(model(x))  # the caller's graph, backward still to come
    got = exact_diagonal(lambda: lo(model(x)), list(model.parameters()))
    handle.remove()
    _assert_equal(got, _dense_diagonal(model, lo, x))
    assert seen == []  # no backward through the user's module hooks
    pending.backward()
    assert seen == [1]


def test_other_threads_are_not_recorded():
    model = _mlp([4, 6, 3], nn.Tanh)
    x = torch.randn(8, 4, dtype=torch.float64)
    lo = _losses(8, 3, torch.device("cpu"))["ce-mean"]

    def loss_fn():
        # the same modules run in another thread while the hooks are installed
        t = threading.Thread(target=lambda: model(x))
        t.start()
        t.join()
        return lo(model(x))

    _assert_equal(exact_diagonal(loss_fn, list(model.parameters())), _dense_diagonal(model, lo, x))


def test_agrees_with_backpack_diag_hessian():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagHessian

    torch.manual_seed(0)
    model = backpack.extend(_mlp([6, 8, 8, 3], nn.Sigmoid))
    lossfunc = backpack.extend(nn.CrossEntropyLoss())
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    with backpack.backpack(DiagHessian()):
        lossfunc(model(x), y).backward()
    ref = [p.diag_h.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _assert_equal(exact_diagonal(lambda: lossfunc(model(x), y), list(model.parameters())), ref)


def test_hessian_diagonal_exact_takes_the_fast_path(monkeypatch):
    model = _mlp([4, 6, 3], nn.Tanh)
    x = torch.randn(8, 4, dtype=torch.float64)
    lo = _losses(8, 3, torch.device("cpu"))["ce-mean"]
    products = count_products(monkeypatch)
    diag = gl.hessian_diagonal(lambda: lo(model(x)), model, method="exact")
    assert products == []  # no Hessian-vector products were needed
    ref = _dense_diagonal(model, lo, x)
    _assert_equal(list(diag.values()), ref)
    # tensors and a single tensor give the same numbers, structured like params
    seq = gl.hessian_diagonal(lambda: lo(model(x)), list(model.parameters()), method="exact")
    _assert_equal(list(seq), ref)
    one = gl.hessian_diagonal(lambda: lo(model(x)), model[2].weight, method="exact")
    _assert_equal([one], ref[2:3])
    with torch.no_grad():  # the caller's grad mode does not matter
        _assert_equal(exact_diagonal(lambda: lo(model(x)), list(model.parameters())), ref)
    # where the fast path declines, the HVP fallback gives the same dense diagonal
    from gradlab.curvature import _backprop

    monkeypatch.setattr(_backprop, "exact_diagonal", lambda *a: None)
    slow = gl.hessian_diagonal(lambda: lo(model(x)), model, method="exact")
    _assert_equal(list(slow.values()), ref)
    assert products  # and that one did run products


def test_public_api_uses_the_cross_entropy_closed_form(monkeypatch):
    # the operator hands exact_diagonal its loss reshaped to a 0-d view: the closed form must
    # see through it (else C + 1 autograd products through the loss run instead)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    lo = _losses(6, 3, torch.device("cpu"))["ce-mean"]
    ref = _dense_diagonal(model, lo, x)

    def refuse(*args):
        raise AssertionError("autograd's loss Hessian was used")

    monkeypatch.setattr(_backprop, "_output_hessian", refuse)
    diag = gl.hessian_diagonal(lambda: lo(model(x)), model, method="exact")
    _assert_equal(list(diag.values()), ref)
    reshaped = exact_diagonal(lambda: lo(model(x)).reshape(1).reshape(()), list(model.parameters()))
    _assert_equal(reshaped, ref)
