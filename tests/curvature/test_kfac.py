"""gradlab.curvature._kfac: KFAC factors and products against curvlinops and exact identities.

Without curvlinops: with one sample (N = 1) and no weight sharing, each layer's block of the GGN
is exactly ``B kron A`` (``J^T s = g kron a``), so KFAC's diagonal blocks equal the dense GGN's
(torch.func); with curvlinops installed, the factors equal its ``KFACLinearOperator``'s to 1e-8.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlab as gl

TOL = dict(rtol=1e-8, atol=1e-10)


class _Net(nn.Module):
    """Not a Sequential: layers in a ModuleDict, a functional activation between them."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        first = nn.Conv2d(1, 2, 3, stride=2, padding=1) if conv else nn.Linear(4, 5)
        last = nn.Linear(18 if conv else 5, 3)
        self.layers = nn.ModuleDict({"first": first, "last": last})

    def forward(self, x):
        h = torch.tanh(self.layers["first"](x))
        return self.layers["last"](h.flatten(1))


def _problem(arch, loss, n, device):
    torch.manual_seed(0)
    model = _Net(arch == "cnn").double().to(device)
    g = torch.Generator().manual_seed(2)
    X = torch.randn((n, 4) if arch == "mlp" else (n, 1, 5, 5), generator=g, dtype=torch.float64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X.to(device), torch.randint(0, 3, (n,)).to(device)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return model, nn.MSELoss(), X.to(device), y.to(device)


def _dense_ggn(model, loss_fn, X, y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(th):
        params = {k: t.reshape(s) for k, t, s in zip(names, th.split(sizes), shapes)}
        return torch.func.functional_call(model, params, (X,))

    out = f(theta).detach()
    J = torch.func.jacrev(f)(theta).reshape(out.numel(), -1)
    Hl = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ Hl.reshape(out.numel(), -1) @ J, sizes


CASES = [(a, b) for a in ("mlp", "cnn") for b in ("ce", "mse")]


@pytest.mark.parametrize(("arch", "loss"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_one_sample_blocks_are_exact(arch, loss, device):
    model, loss_fn, X, y = _problem(arch, loss, 1, device)
    if arch == "cnn":  # no weight sharing in the conv: one output position (kernel = input)
        model.layers["first"] = nn.Conv2d(1, 18, 5).double().to(device)
    G, sizes = _dense_ggn(model, loss_fn, X, y)
    K = gl.kfac_operator(model, loss_fn, (X, y))
    dense = K @ torch.eye(K.shape[0], dtype=torch.float64, device=device)
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        torch.testing.assert_close(dense[block, block], G[block, block], **TOL)
        start += size
    off = dense.clone()
    start = 0
    for size in sizes:
        off[start : start + size, start : start + size] = 0
        start += size
    assert float(off.abs().max()) == 0.0  # blocks of different parameters are zero


@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize(("arch", "loss"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_factors_match_curvlinops(arch, loss, fisher):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = _problem(arch, loss, 6, "cpu")
    extra = dict(mc_samples=2) if fisher == "mc" else {}
    K = gl.kfac_operator(
        model, loss_fn, (X, y), fisher=fisher, **extra, **({"generator": 5} if extra else {})
    )
    C = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        list(model.parameters()),
        [(X, y)],
        fisher_type=fisher,
        **extra,
        **({"seed": 5} if extra else {}),
    )
    for name, (A, B) in K.factors.items():
        torch.testing.assert_close(A, C._input_covariances[name], **TOL)
        torch.testing.assert_close(B, C._gradient_covariances[name], **TOL)
    eye = torch.eye(K.shape[0], dtype=torch.float64)
    torch.testing.assert_close(K @ eye, C @ eye, **TOL)
    for damping in (1e-3, 0.5):
        inv = curvlinops.KFACInverseLinearOperator(C, damping=damping)
        torch.testing.assert_close(K.inverse(damping=damping) @ eye, inv @ eye, **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_data_and_weight_sharing_conventions(approx):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = _problem("cnn", "ce", 8, "cpu")
    K = gl.kfac_operator(model, loss_fn, data=[(X[:5], y[:5]), (X[5:], y[5:])], kfac_approx=approx)
    C = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        list(model.parameters()),
        [(X[:5], y[:5]), (X[5:], y[5:])],
        fisher_type="type-2",
        kfac_approx=approx,
    )
    for name, (A, B) in K.factors.items():
        torch.testing.assert_close(A, C._input_covariances[name], **TOL)
        torch.testing.assert_close(B, C._gradient_covariances[name], **TOL)


def test_inverse_inverts_the_damped_operator(device):
    model, loss_fn, X, y = _problem("cnn", "ce", 6, device)
    K = gl.kfac_operator(model, loss_fn, (X, y), damping=1e-2)
    assert all(not m._forward_hooks for m in model.modules())  # the capture hooks are gone
    assert all(p.grad is None for p in model.parameters())
    v = torch.randn(K.shape[0], dtype=torch.float64, device=device)
    torch.testing.assert_close(K.inverse() @ (K @ v), v, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(K @ (K.inverse() @ v), v, rtol=1e-8, atol=1e-8)
    undamped = gl.kfac_operator(model, loss_fn, (X, y))
    eye = torch.eye(K.shape[0], dtype=torch.float64, device=device)
    # damping adds lambda to each factor: (B + l I) kron (A + l I) on a weight block
    (A, B) = undamped.factors["layers.last"]
    lam = 1e-2
    expected = torch.kron(
        B + lam * torch.eye(3, device=device, dtype=B.dtype),
        A + lam * torch.eye(18, device=device, dtype=A.dtype),
    )
    w = slice(K.offsets[2], K.offsets[3])
    torch.testing.assert_close((K @ eye)[w, w], expected, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    model, loss_fn, X, y = _problem("mlp", "ce", 4, "cpu")
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(
        ValueError,
        match=r"kfac_operator: model must hold its trainable parameters in nn.Linear or "
        r"nn.Conv2d layers, got '1.weight' in a BatchNorm1d \('1'\)",
    ):
        gl.kfac_operator(bn, loss_fn, (X, y))
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(18, 3)).double()
    with pytest.raises(
        ValueError, match=r"kfac_operator: model must use Conv2d layers with groups=1"
    ):
        gl.kfac_operator(grouped, loss_fn, (torch.randn(4, 2, 5, 5, dtype=torch.float64), y))
    with pytest.raises(ValueError, match=r"kfac_operator: fisher must be one of 'type-2', 'mc'"):
        gl.kfac_operator(model, loss_fn, (X, y), fisher="kfac")
    with pytest.raises(ValueError, match=r"kfac_operator: damping must be a float >= 0, got -1"):
        gl.kfac_operator(model, loss_fn, (X, y), damping=-1)
    with pytest.raises(ValueError, match=r"kfac_operator: mc_samples= and generator= are used"):
        gl.kfac_operator(model, loss_fn, (X, y), generator=0)
    K = gl.kfac_operator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match=r"kfac_operator.inverse: damping must be a float >= 0"):
        K.inverse(damping=-0.1)
    seq = nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (3, 1))).double()
    with pytest.raises(
        ValueError, match=r"kfac_operator: the model output must have shape \(N, C\)"
    ):
        gl.kfac_operator(seq, nn.MSELoss(), (X, torch.zeros(4, 3, 1, dtype=torch.float64)))


def test_columns_backpropagated_one_by_one_give_the_same_factors(monkeypatch):
    """Convolution models with large outputs backpropagate the factor columns one at a time
    (no stacking); forced here on a small one, the factors and the diagonal are unchanged."""
    from gradlab.curvature import _ggn

    model, loss_fn, X, y = _problem("cnn", "ce", 6, "cpu")
    batched = gl.kfac_operator(model, loss_fn, (X, y))
    diag = gl.ggn_diagonal(model, loss_fn, (X, y))
    monkeypatch.setattr(_ggn, "_STACK_LIMIT", 0)
    looped = gl.kfac_operator(model, loss_fn, (X, y))
    for name, (A, B) in batched.factors.items():
        torch.testing.assert_close(looped.factors[name][0], A, **TOL)
        torch.testing.assert_close(looped.factors[name][1], B, **TOL)
    for name, d in gl.ggn_diagonal(model, loss_fn, (X, y)).items():
        torch.testing.assert_close(d, diag[name], **TOL)
