"""gradlab.curvature._ggn: GGN and Fisher operators against dense torch.func references.

The references are written out independently: the GGN as ``J^T (d2 L / d f2) J`` with ``J`` from
``torch.func.jacrev`` and the loss Hessian from ``torch.func.hessian``; the empirical Fisher as
``c * sum_n g_n g_n^T`` with ``g_n`` the gradient of sample n's loss term (``c`` the reduction
factor, curvlinops' convention); the MC Fisher against the GGN (its expectation). curvlinops, if
installed, is a second reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlab as gl
from gradlab import curvature

TOL = dict(rtol=1e-10, atol=1e-10)


def _model(arch: str, out: int, device) -> nn.Module:
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, out),
        )
    return model.double().to(device)


def _problem(arch: str, loss: str, reduction: str, device, n: int = 6):
    out = 3
    model = _model(arch, out, device)
    g = torch.Generator().manual_seed(1)
    shape = (n, 4) if arch == "mlp" else (n, 1, 5, 5)
    X = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    if loss == "ce":
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, out, (n,), generator=g).to(device)
    else:
        loss_fn = nn.MSELoss(reduction=reduction)
        y = torch.randn(n, out, generator=g, dtype=torch.float64).to(device)
    return model, loss_fn, X, y


def _flat(model):
    names = [k for k, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(th, X):
        params = {k: t.reshape(s) for k, t, s in zip(names, th.split(sizes), shapes)}
        return torch.func.functional_call(model, params, (X,))

    return theta, f


def _dense_ggn(model, loss_fn, X, y):
    theta, f = _flat(model)
    out = f(theta, X).detach()
    J = torch.func.jacrev(lambda th: f(th, X))(theta).reshape(out.numel(), -1)
    Hl = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ Hl.reshape(out.numel(), out.numel()) @ J


def _dense_ef(model, loss_fn, X, y):
    theta, f = _flat(model)
    total = nn.functional.cross_entropy if isinstance(loss_fn, nn.CrossEntropyLoss) else None
    per_term = type(loss_fn)(reduction="sum")
    out = f(theta, X)
    c = 1.0
    if loss_fn.reduction == "mean":
        c = 1.0 / (X.shape[0] if total is not None else out.numel())
    F = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    for i in range(X.shape[0]):
        xi, yi = X[i : i + 1], y[i : i + 1]
        g = torch.func.grad(lambda th, xi=xi, yi=yi: per_term(f(th, xi), yi))(theta)
        F += c * torch.outer(g, g)
    return F


def _eye(op):
    return torch.eye(op.shape[0], dtype=op.dtype, device=op.device)


CASES = [
    (arch, loss, red)
    for arch in ("mlp", "cnn")
    for loss in ("ce", "mse")
    for red in ("mean", "sum")
]
IDS = [f"{a}-{b}-{c}" for a, b, c in CASES]


@pytest.mark.parametrize(("arch", "loss", "reduction"), CASES, ids=IDS)
def test_ggn_products_and_dense_matrix(arch, loss, reduction, device):
    model, loss_fn, X, y = _problem(arch, loss, reduction, device)
    G = _dense_ggn(model, loss_fn, X, y)
    op = gl.ggn_operator(model, loss_fn, (X, y))
    torch.testing.assert_close(op @ _eye(op), G, **TOL)  # matmat: the dense matrix
    v = torch.randn(op.shape[0], dtype=torch.float64, device=device)
    torch.testing.assert_close(op @ v, G @ v, **TOL)  # matvec
    pieces = list(op._split(v.reshape(1, -1)))
    flat = torch.cat([p.reshape(-1) for p in op @ [p[0] for p in pieces]])
    torch.testing.assert_close(flat, G @ v, **TOL)  # per-parameter pieces


@pytest.mark.parametrize(("arch", "loss", "reduction"), CASES, ids=IDS)
def test_empirical_fisher_dense_matrix(arch, loss, reduction, device):
    model, loss_fn, X, y = _problem(arch, loss, reduction, device)
    F = _dense_ef(model, loss_fn, X, y)
    op = gl.fisher_operator(model, loss_fn, (X, y), kind="empirical")
    torch.testing.assert_close(op @ _eye(op), F, **TOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_fisher_is_unbiased_for_the_ggn(loss, device):
    model, loss_fn, X, y = _problem("mlp", loss, "mean", device)
    G = _dense_ggn(model, loss_fn, X, y)
    v = torch.randn(G.shape[0], dtype=torch.float64, device=device)
    seeds = 300
    samples = torch.stack(
        [
            gl.fisher_operator(model, loss_fn, (X, y), kind="mc", generator=s) @ v
            for s in range(seeds)
        ]
    )
    mean, se = samples.mean(0), samples.std(0) / seeds**0.5
    assert bool(((mean - G @ v).abs() <= 4 * se + 1e-12).all())
    # a fixed matrix: the same generator gives the same operator; mc_samples averages draws
    a = gl.fisher_operator(model, loss_fn, (X, y), kind="mc", generator=7, mc_samples=3)
    b = gl.fisher_operator(model, loss_fn, (X, y), kind="mc", generator=7, mc_samples=3)
    torch.testing.assert_close(a @ v, b @ v, rtol=0, atol=0)
    torch.testing.assert_close(a @ v, a @ v, rtol=0, atol=0)


def test_ggn_of_linear_model_with_mse_is_the_hessian(device):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double().to(device)
    X = torch.randn(7, 4, dtype=torch.float64, device=device)
    y = torch.randn(7, 2, dtype=torch.float64, device=device)
    G = gl.ggn_operator(model, nn.MSELoss(), (X, y))
    H = gl.hessian_operator(lambda: nn.functional.mse_loss(model(X), y), model)
    torch.testing.assert_close(G @ _eye(G), H @ _eye(H), **TOL)


def test_data_equals_the_full_batch_and_estimators_run(device):
    model, loss_fn, X, y = _problem("mlp", "ce", "mean", device, n=9)
    full = gl.ggn_operator(model, loss_fn, (X, y))
    split = gl.ggn_operator(model, loss_fn, data=[(X[:4], y[:4]), (X[4:], y[4:])])
    torch.testing.assert_close(split @ _eye(split), full @ _eye(full), **TOL)
    dense = full @ _eye(full)
    torch.testing.assert_close(curvature.trace(split, method="exact"), dense.trace(), **TOL)
    torch.testing.assert_close(curvature.diagonal(full, method="exact"), dense.diagonal(), **TOL)
    ev = torch.linalg.eigvalsh(dense)
    top = curvature.eigenvalues(split, k=2, tol=1e-10, generator=0).values
    torch.testing.assert_close(top, ev.flip(0)[:2], rtol=1e-8, atol=1e-10)


def test_functional_loss_and_custom_loss_hessian(device):
    model, loss_fn, X, y = _problem("mlp", "mse", "mean", device)
    G = _dense_ggn(model, loss_fn, X, y)
    op = gl.ggn_operator(model, nn.functional.mse_loss, (X, y))
    torch.testing.assert_close(op @ _eye(op), G, **TOL)
    custom = gl.ggn_operator(
        model,
        lambda o, t: ((o - t) ** 2).mean(),
        (X, y),
        loss_hessian=lambda o, t, U: 2 * U / o.numel(),
    )
    torch.testing.assert_close(custom @ _eye(custom), G, **TOL)


def test_complex_vectors_apply_to_both_parts(device):
    model, loss_fn, X, y = _problem("mlp", "ce", "mean", device)
    G = _dense_ggn(model, loss_fn, X, y)
    op = gl.ggn_operator(model, loss_fn, (X, y))
    v = torch.randn(G.shape[0], dtype=torch.complex128, device=device)
    torch.testing.assert_close(op @ v, G.to(v.dtype) @ v, **TOL)
    if device.type == "cpu":
        out = op.to_scipy().matvec(v.numpy())
        torch.testing.assert_close(torch.from_numpy(out), G.to(v.dtype) @ v, **TOL)


def test_nothing_is_left_behind():
    model, loss_fn, X, y = _problem("cnn", "ce", "mean", "cpu")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = gl.fisher_operator(model, loss_fn, (X, y), kind="mc", generator=0)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


class _OnceTanh(torch.autograd.Function):
    """tanh with a backward that cannot be differentiated (no double backward) and a jvp."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _OnceTanhModule(nn.Module):
    def forward(self, x):
        return _OnceTanh.apply(x)


def test_every_jvp_path_gives_the_dense_product(device):
    """Jv by double vjp (a kept batch, no convolution), by forward mode (several batches; an op
    without double backward), and vmapped (matmat): all equal the dense GGN."""
    model, loss_fn, X, y = _problem("mlp", "ce", "mean", device)
    G = _dense_ggn(model, loss_fn, X, y)
    v = torch.randn(G.shape[0], dtype=torch.float64, device=device)
    kept = gl.ggn_operator(model, loss_fn, (X, y))
    torch.testing.assert_close(kept @ v, G @ v, **TOL)
    torch.testing.assert_close(kept @ v, G @ v, **TOL)  # the kept graph of J^T u, reused
    assert kept._cache is not None and kept._cache[0].transposed[0] is not None
    halves = [(X[:3], y[:3]), (X[3:], y[3:])]
    split = gl.ggn_operator(model, loss_fn, data=halves)
    torch.testing.assert_close(split @ v, G @ v, **TOL)
    torch.testing.assert_close(
        split @ torch.stack([v, 2 * v], 1), G @ torch.stack([v, 2 * v], 1), **TOL
    )
    once = nn.Sequential(model[0], _OnceTanhModule(), model[2])
    op = gl.ggn_operator(once, loss_fn, (X, y))
    torch.testing.assert_close(op @ v, G @ v, **TOL)
    torch.testing.assert_close(op @ v, G @ v, **TOL)
    assert op._cache is not None and op._cache[0].transposed is None  # forward mode


def test_products_inside_the_callers_forward_mode_level_are_refused():
    """Forward-mode levels do not nest (torch.func.jvp fails there too): a clear error."""
    import torch.autograd.forward_ad as fwAD

    model, loss_fn, X, y = _problem("cnn", "ce", "mean", "cpu")
    op = gl.ggn_operator(model, loss_fn, (X, y))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=r"ggn_operator: products cannot"):
        op @ v
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)  # outside: fine


class _NoJvp(torch.autograd.Function):
    """A custom op with a backward but no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_a_failing_product_leaves_the_parameters_in_place():
    model, loss_fn, X, y = _problem("mlp", "ce", "mean", "cpu")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return _NoJvp.apply(self.inner(x))

    net = Net()
    before = [(n, p) for n, p in net.named_parameters()]
    op = gl.ggn_operator(net, loss_fn, (X, y))
    with pytest.raises(RuntimeError):  # no jvp rule: forward mode fails
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    after = list(net.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q and isinstance(p, nn.Parameter) for (_, p), (_, q) in zip(after, before))


def test_tied_parameters_and_the_model_is_restored(device):
    """A weight shared by two layers is one parameter; products swap it in and back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double().to(device)
    model[2].weight = model[0].weight
    X = torch.randn(5, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (5,), device=device)
    W, b0, b2 = (p.detach() for p in model.parameters())

    def f(theta):  # the same model written out, on flat parameters
        w, c0, c2 = theta[:16].reshape(4, 4), theta[16:20], theta[20:]
        return torch.tanh(X @ w.T + c0) @ w.T + c2

    theta = torch.cat([W.flatten(), b0, b2])
    out = f(theta)
    J = torch.func.jacrev(f)(theta).reshape(out.numel(), -1)
    Hl = torch.func.hessian(lambda o: nn.functional.cross_entropy(o.reshape(out.shape), y))(
        out.reshape(-1)
    )
    G = J.T @ Hl.reshape(out.numel(), -1) @ J
    op = gl.ggn_operator(model, nn.CrossEntropyLoss(), (X, y))
    assert op.shape == (24, 24)
    v = torch.randn(24, dtype=torch.float64, device=device)
    torch.testing.assert_close(op @ v, G @ v, **TOL)
    torch.testing.assert_close(op @ _eye(op), G, **TOL)
    params = list(model.parameters())
    assert isinstance(model[0].weight, nn.Parameter) and model[2].weight is model[0].weight
    assert [p is q for p, q in zip(params, (W, b0, b2))] == [False] * 3  # detached views
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize(("arch", "loss"), [("mlp", "ce"), ("cnn", "mse")])
def test_against_curvlinops(arch, loss):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = _problem(arch, loss, "mean", "cpu")
    params = list(model.parameters())
    for ours, theirs in (
        (gl.ggn_operator, curvlinops.GGNLinearOperator),
        (
            lambda *a: gl.fisher_operator(*a, kind="empirical"),
            curvlinops.EFLinearOperator,
        ),
    ):
        C = theirs(model, loss_fn, params, [(X, y)])
        op = ours(model, loss_fn, (X, y))
        torch.testing.assert_close(op @ _eye(op), C @ _eye(op), **TOL)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda m, X, y: gl.ggn_operator(m, nn.L1Loss(), (X, y)),
            TypeError,
            r"ggn_operator: loss_fn must be a loss with a known Hessian .*got L1Loss\. "
            r"Supported: nn\.CrossEntropyLoss.*pass loss_hessian=",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss(weight=torch.ones(3)), (X, y)),
            TypeError,
            r"ggn_operator: loss_fn has weight=",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss(reduction="none"), (X, y)),
            ValueError,
            r"ggn_operator: loss_fn must have reduction 'mean' or 'sum', got 'none'",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss(), X),
            TypeError,
            r"ggn_operator: the batch must be a pair \(X, y\).*got a Tensor",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss(), (X, y), data=[(X, y)]),
            ValueError,
            r"ggn_operator: pass exactly one of the batch .* got both",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss()),
            ValueError,
            r"got neither",
        ),
        (
            lambda m, X, y: gl.ggn_operator(lambda x: m(x), nn.CrossEntropyLoss(), (X, y)),
            TypeError,
            r"ggn_operator: model must be an nn.Module, got function",
        ),
        (
            lambda m, X, y: gl.ggn_operator(m, nn.CrossEntropyLoss(), (X[:0], y[:0])),
            ValueError,
            r"ggn_operator: the batch is empty \(X has shape \(0, 4\)\)",
        ),
        (
            lambda m, X, y: (
                gl.ggn_operator(m, nn.CrossEntropyLoss(), (X, y.double()))
                @ [torch.zeros_like(p) for p in m.parameters()]
            ),
            ValueError,
            r"ggn_operator: cross-entropy targets must be class indices",
        ),
        (
            lambda m, X, y: gl.fisher_operator(m, nn.CrossEntropyLoss(), (X, y), kind="true"),
            ValueError,
            r"fisher_operator: kind must be one of 'empirical', 'mc', got 'true'",
        ),
        (
            lambda m, X, y: gl.fisher_operator(m, nn.CrossEntropyLoss(), (X, y), generator=0),
            ValueError,
            r"fisher_operator: mc_samples= and generator= are used by kind='mc' only",
        ),
        (
            lambda m, X, y: gl.fisher_operator(
                m, nn.CrossEntropyLoss(), (X, y), kind="mc", mc_samples=0
            ),
            ValueError,
            r"fisher_operator: mc_samples must be an int >= 1, got 0",
        ),
    ],
    ids=[
        "unknown-loss",
        "class-weights",
        "reduction-none",
        "batch-not-pair",
        "batch-and-data",
        "no-batch",
        "model-not-module",
        "empty-batch",
        "soft-targets",
        "fisher-kind",
        "empirical-generator",
        "mc-samples",
    ],
)
def test_bad_inputs(call, error, match):
    model, _, X, y = _problem("mlp", "ce", "mean", "cpu")
    with pytest.raises(error, match=match):
        call(model, X, y)


def _flat_dict(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize(("arch", "loss", "reduction"), CASES, ids=IDS)
def test_exact_ggn_diagonal_equals_the_dense_diagonal(arch, loss, reduction, device):
    model, loss_fn, X, y = _problem(arch, loss, reduction, device)
    G = _dense_ggn(model, loss_fn, X, y)
    d = gl.ggn_diagonal(model, loss_fn, (X, y))
    assert list(d) == [k for k, _ in model.named_parameters()]
    assert all(d[k].shape == p.shape for k, p in model.named_parameters())
    torch.testing.assert_close(_flat_dict(d), G.diagonal(), **TOL)
    # the estimator's exact method on the operator takes the same path
    op = gl.ggn_operator(model, loss_fn, (X, y))
    torch.testing.assert_close(curvature.diagonal(op, method="exact"), G.diagonal(), **TOL)
    F = _dense_ef(model, loss_fn, X, y)
    ef = gl.fisher_operator(model, loss_fn, (X, y))
    torch.testing.assert_close(curvature.diagonal(ef, method="exact"), F.diagonal(), **TOL)


def test_ggn_diagonal_with_data_and_bce(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double().to(device)
    X = torch.randn(7, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 2, (7, 2), device=device).double()
    loss_fn = nn.BCEWithLogitsLoss()
    G = _dense_ggn(model, loss_fn, X, y)
    d = gl.ggn_diagonal(model, loss_fn, data=[(X[:3], y[:3]), (X[3:], y[3:])])
    torch.testing.assert_close(_flat_dict(d), G.diagonal(), **TOL)
    op = gl.ggn_operator(model, loss_fn, (X, y))
    torch.testing.assert_close(op @ _eye(op), G, **TOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_ggn_diagonal_is_the_mc_fishers_diagonal_and_unbiased(loss, device):
    model, loss_fn, X, y = _problem("cnn", loss, "mean", device)
    F = gl.fisher_operator(model, loss_fn, (X, y), kind="mc", generator=3, mc_samples=2)
    d = gl.ggn_diagonal(model, loss_fn, (X, y), method="mc", generator=3, mc_samples=2)
    torch.testing.assert_close(_flat_dict(d), (F @ _eye(F)).diagonal(), **TOL)
    G = _dense_ggn(model, loss_fn, X, y)
    draws = torch.stack(
        [
            _flat_dict(gl.ggn_diagonal(model, loss_fn, (X, y), method="mc", generator=s))
            for s in range(200)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / 200**0.5
    assert bool(((mean - G.diagonal()).abs() <= 4 * se + 1e-12).all())


def test_ggn_diagonal_against_backpack():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    model, loss_fn, X, y = _problem("cnn", "ce", "mean", "cpu")
    ours = gl.ggn_diagonal(model, loss_fn, (X, y))
    ext_model, ext_loss = backpack.extend(model), backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(DiagGGNExact()):
        ext_loss(ext_model(X), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.diag_ggn_exact, **TOL)


def test_ggn_diagonal_bad_inputs():
    model, loss_fn, X, y = _problem("mlp", "ce", "mean", "cpu")
    with pytest.raises(ValueError, match=r"ggn_diagonal: method must be one of 'exact', 'mc'"):
        gl.ggn_diagonal(model, loss_fn, (X, y), method="kfac")
    with pytest.raises(ValueError, match=r"ggn_diagonal: mc_samples= and generator= are used"):
        gl.ggn_diagonal(model, loss_fn, (X, y), generator=0)
    with pytest.raises(TypeError, match=r"ggn_diagonal: loss_fn must be a loss with a known"):
        gl.ggn_diagonal(model, nn.HuberLoss(), (X, y))


def test_ggn_diagonal_linear_layers_on_sequences(device):
    """Linear layers applied over a sequence dimension: per-sample gradients sum over steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3))
    model = model.double().to(device)
    X = torch.randn(6, 2, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (6,), device=device)
    G = _dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    d = gl.ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(_flat_dict(d), G.diagonal(), **TOL)
    shared = nn.Linear(4, 4).double().to(device)  # one layer called twice: the vmapped path
    twice = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)).double().to(device)
    G2 = _dense_ggn(twice, nn.CrossEntropyLoss(), X[:, 0], y)
    d2 = gl.ggn_diagonal(twice, nn.CrossEntropyLoss(), (X[:, 0], y))
    torch.testing.assert_close(_flat_dict(d2), G2.diagonal(), **TOL)


@pytest.mark.parametrize(
    ("stacked", "buffer", "limit"),
    [(1 << 20, 1 << 20, 1 << 19), (0, 1 << 20, 1 << 19), (0, 1, 0), (0, 1000, 0)],
    ids=["stacked", "one-buffer", "per-column", "buffer-remainder"],
)
def test_exact_ggn_diagonal_squares_paths(stacked, buffer, limit, monkeypatch, device):
    """Every way of forming the squared per-sample gradients (all columns stacked into one
    product; a buffer of all columns; one column at a time; groups of 3 of the 4 columns, then
    the remainder), with the columns backpropagated batched or one by one, gives the dense
    diagonal."""
    from gradlab.curvature import _ggn

    monkeypatch.setattr(_ggn, "_STACKED_ELEMENTS", stacked)
    monkeypatch.setattr(_ggn, "_SQUARES_ELEMENTS", buffer)
    monkeypatch.setattr(_ggn, "_STACK_LIMIT", limit)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    model = model.double().to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 2, 7, 7, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    G = _dense_ggn(model, loss_fn, X, y)
    d = gl.ggn_diagonal(model, loss_fn, (X, y))
    torch.testing.assert_close(_flat_dict(d), G.diagonal(), **TOL)
