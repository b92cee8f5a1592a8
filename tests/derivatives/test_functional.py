"""jacobian / hessian / hvp / vjp / jvp / functional: every strategy against torch.func, float64
finite differences and a dense-Hessian product; structures; errors; the auto measurement."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradlab as gl
from gradlab._derivatives import HESSIAN, HVP_OP, JACOBIAN
from tests._reference import fd_hessian, fd_jacobian

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=10)
CHUNKS = [None, 2]


def assert_tree_close(a, b, **kw):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, f"structure {sa} != {sb}"
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **kw)


def _net(n: int, m: int, g: torch.Generator, device):
    W1 = torch.randn(m, n, generator=g, dtype=torch.float64).to(device) / n**0.5
    W2 = torch.randn(3, m, generator=g, dtype=torch.float64).to(device) / m**0.5
    return lambda x: W2 @ torch.tanh(W1 @ x)


@fixture_ok
@given(n=st.integers(1, 5), m=st.integers(1, 4), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("strategy", [*JACOBIAN.names, "auto"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=["whole", "chunk2"])
def test_jacobian_matches_torch_func_and_fd(strategy, chunk_size, n, m, seed, device):
    g = torch.Generator().manual_seed(seed)
    f = _net(n, m, g, device)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    J = gl.jacobian(f, x, strategy=strategy, chunk_size=chunk_size)
    torch.testing.assert_close(J, torch.func.jacrev(f)(x))
    torch.testing.assert_close(J, fd_jacobian(f, x), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("strategy", [*JACOBIAN.names, "auto"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=["whole", "chunk2"])
def test_jacobian_structure_multi_arg_multi_output(strategy, chunk_size, device):
    a = torch.randn(3, 2, dtype=torch.float64, device=device)
    b = {"u": torch.randn(2, dtype=torch.float64, device=device)}

    def f(a, b):
        return {"s": (a * b["u"]).sum(0), "t": (a.sin(), b["u"].exp())}

    for argnums in [0, 1, (0, 1), (1,), -1]:
        got = gl.jacobian(f, a, b, argnums=argnums, strategy=strategy, chunk_size=chunk_size)
        assert_tree_close(got, torch.func.jacrev(f, argnums)(a, b))


@fixture_ok
@given(n=st.integers(1, 5), m=st.integers(1, 4), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("strategy", [*HESSIAN.names, "auto"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=["whole", "chunk2"])
def test_hessian_matches_torch_func_and_fd(strategy, chunk_size, n, m, seed, device):
    g = torch.Generator().manual_seed(seed)
    net = _net(n, m, g, device)

    def f(x):
        return net(x).pow(2).sum() + x.sin().sum()

    x = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    H = gl.hessian(f, x, strategy=strategy, chunk_size=chunk_size)
    torch.testing.assert_close(H, torch.func.hessian(f)(x))
    torch.testing.assert_close(H, fd_hessian(f, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", [*HESSIAN.names, "auto"])
def test_hessian_structures(strategy, device):
    a = torch.randn(3, dtype=torch.float64, device=device)
    b = torch.randn(2, 2, dtype=torch.float64, device=device)

    def f(a, b):
        return (a.sin().sum() * b.cos()).sum() + (a**3).sum()

    for argnums in [0, 1, (0, 1)]:
        got = gl.hessian(f, a, b, argnums=argnums, strategy=strategy)
        assert_tree_close(got, torch.func.hessian(f, argnums)(a, b))


def _model(device):
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
        .double()
        .to(device)
    )


@pytest.mark.parametrize("strategy", [*HESSIAN.names, "auto"])
def test_hessian_wrt_parameter_dict_with_eval_batchnorm(strategy, device):
    model = _model(device).eval()
    fm = gl.functional(model)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(p):
        return fm(p, x).pow(2).mean()

    H = gl.hessian(loss, fm.params, strategy=strategy)
    assert_tree_close(H, torch.func.hessian(loss)(fm.params))
    assert set(H) == set(fm.params) and set(H["0.weight"]) == set(fm.params)
    assert H["0.weight"]["3.bias"].shape == (4, 3, 2)
    assert_tree_close(dict(model.state_dict()), state)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training


def test_functional_train_mode_batchnorm(device):
    model = _model(device).train()
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    fm = gl.functional(model)
    with pytest.raises(ValueError, match=r"functional: module '1' \(BatchNorm1d\) is in training"):
        gl.jacobian(lambda p: fm(p, x), fm.params)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fb = gl.functional(model, batchnorm="batch-stats")
    J = gl.jacobian(lambda p: fb(p, x).sum(), fb.params, strategy="reverse")
    # reference: the same network with a BatchNorm that never tracks running statistics
    ref_model = _model(device).train()
    ref_model[1].track_running_stats = False
    ref_model[1].running_mean = ref_model[1].running_var = None
    fr = gl.functional(ref_model)
    assert_tree_close(J, torch.func.jacrev(lambda p: fr(p, x).sum())(fr.params))
    assert_tree_close(dict(model.state_dict()), state)
    assert model.training and model[1].track_running_stats


@fixture_ok
@given(n=st.integers(1, 5), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("strategy", [*HVP_OP.names, "auto"])
def test_hvp_matches_dense_hessian(strategy, n, seed, device):
    g = torch.Generator().manual_seed(seed)
    net = _net(n, 3, g, device)

    def f(x, y):
        return net(x).pow(2).sum() * y.tanh().sum() + (x**3).sum()

    x = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(2, generator=g, dtype=torch.float64).to(device)
    vx = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    vy = torch.randn(2, generator=g, dtype=torch.float64).to(device)
    value, (hx, hy) = gl.hvp(f, (x, y), (vx, vy), strategy=strategy)
    H = torch.func.hessian(f, (0, 1))(x, y)
    torch.testing.assert_close(value, f(x, y))
    torch.testing.assert_close(hx, H[0][0] @ vx + H[0][1] @ vy)
    torch.testing.assert_close(hy, H[1][0] @ vx + H[1][1] @ vy)
    single = gl.hvp(lambda x: f(x, y), x, vx, strategy=strategy)
    assert isinstance(single, gl.HVP) and isinstance(single.hvp, torch.Tensor)
    torch.testing.assert_close(single.hvp, H[0][0] @ vx)


@pytest.mark.parametrize("strategy", [*HVP_OP.names, "auto"])
def test_hvp_parameter_dict_and_unused_input(strategy, device):
    model = _model(device).eval()
    fm = gl.functional(model)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    v = {k: torch.randn_like(t) for k, t in fm.params.items()}

    def loss(p):
        return fm(p, x).pow(2).mean()

    _, hv = gl.hvp(loss, fm.params, v, strategy=strategy)
    _, ref = torch.func.jvp(torch.func.grad(loss), (fm.params,), (v,))
    assert_tree_close(hv, ref)
    # an argument the loss ignores gets a zero product
    _, (h0, h1) = gl.hvp(lambda a, b: (a**3).sum(), (x, x), (x, x), strategy=strategy)
    torch.testing.assert_close(h1, torch.zeros_like(x))
    torch.testing.assert_close(h0, 6 * x * x)


@pytest.mark.parametrize("strategy", [*HVP_OP.names, "auto"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_hvp_linear_unused_and_curved_inputs_together(strategy, grad_mode, device):
    """An input with a constant gradient (no second-order path), an unused one and a curved one
    in one call: the double-backward engine's general path (its fast path needs every input
    curved), against the Hessian written out (H = diag(6 a) on a, zero elsewhere)."""
    g = torch.Generator().manual_seed(5)
    a, b, c, va, vb, vc = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(6))
    a, b, c, va, vb, vc = (t.to(device) for t in (a, b, c, va, vb, vc))

    def f(a, b, c):
        return (a**3).sum() + (2.0 * b).sum()  # b: linear, c: unused

    with torch.set_grad_enabled(grad_mode):
        value, (ha, hb, hc) = gl.hvp(f, (a, b, c), (va, vb, vc), strategy=strategy)
    torch.testing.assert_close(value, f(a, b, c))
    torch.testing.assert_close(ha, 6 * a * va)
    torch.testing.assert_close(hb, torch.zeros_like(b))
    torch.testing.assert_close(hc, torch.zeros_like(c))
    assert value.grad_fn is None and all(h.grad_fn is None for h in (ha, hb, hc))


def test_vjp_and_jvp_match_jacobian(device):
    g = torch.Generator().manual_seed(3)
    f = _net(4, 3, g, device)
    x = torch.randn(4, generator=g, dtype=torch.float64).to(device)
    J = fd_jacobian(f, x)
    u = torch.randn(3, dtype=torch.float64, device=device)
    v = torch.randn(4, dtype=torch.float64, device=device)
    value, vj = gl.vjp(f, x, u)
    torch.testing.assert_close(value, f(x))
    torch.testing.assert_close(vj, u @ J, atol=1e-7, rtol=1e-6)
    value, jv = gl.jvp(f, x, v)
    torch.testing.assert_close(jv, J @ v, atol=1e-7, rtol=1e-6)
    _, (va, _vb) = gl.vjp(lambda a, b: a * b, (x, x), torch.ones_like(x))
    torch.testing.assert_close(va, x)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: gl.jacobian(torch.sin, x),
        lambda x: gl.hessian(lambda z: z.pow(3).sum(), x),
        lambda x: gl.hvp(lambda z: z.pow(3).sum(), x, torch.ones_like(x)),
        lambda x: gl.jvp(torch.sin, x, torch.ones_like(x)),
        lambda x: gl.vjp(torch.sin, x, torch.ones_like(x)),
    ],
    ids=["jacobian", "hessian", "hvp", "jvp", "vjp"],
)
def test_works_under_no_grad(call, device):
    x = torch.randn(3, device=device)
    with torch.enable_grad():
        expected = call(x)
    with torch.no_grad():
        got = call(x)
    assert_tree_close(got, expected)


def test_errors():
    x = torch.randn(3)
    with pytest.raises(
        ValueError, match=r"hessian: f must be a function returning a scalar .*shape=\(3,\)"
    ):
        gl.hessian(torch.sin, x, strategy="rev-rev")
    for s in HESSIAN.names:
        with pytest.raises(ValueError, match=r"hessian: f must be a function returning a scalar"):
            gl.hessian(torch.sin, x, strategy=s)
    with pytest.raises(ValueError, match=r"hvp: f must be a function returning a scalar"):
        gl.hvp(torch.sin, x, x, strategy="double-backward")
    with pytest.raises(
        ValueError, match=r"jacobian: strategy must be one of .*'reverse'.*, got 'fast'"
    ):
        gl.jacobian(torch.sin, x, strategy="fast")
    with pytest.raises(
        ValueError, match=r"hessian: strategy must be one of .*'rev-rev', 'fwd-rev'"
    ):
        gl.hessian(torch.sin, x, strategy="reverse")
    with pytest.raises(ValueError, match=r"hvp: strategy must be one of .*'double-backward'"):
        gl.hvp(torch.sin, x, x, strategy="loop")
    with pytest.raises(
        ValueError,
        match=r"jacobian: argnums must be in range for 2 argument\(s\), got 2\. Use 0\.\.1",
    ):
        gl.jacobian(torch.add, x, x, argnums=2)
    with pytest.raises(
        ValueError, match=r"hessian: argnums must be in range for 2 argument\(s\), got \(0, 5\)"
    ):
        gl.hessian(lambda a, b: (a * b).sum(), x, x, argnums=(0, 5))
    with pytest.raises(
        TypeError,
        match=r"jacobian: x must be a floating-point tensor, got tensor\(.*dtype=torch.int64",
    ):
        gl.jacobian(lambda z: z * 2, torch.arange(3))
    with pytest.raises(TypeError, match=r"hvp: .*dtype=torch.int64"):
        gl.hvp(lambda z: z.sum(), torch.arange(3), torch.arange(3))
    with pytest.raises(
        ValueError,
        match=r"hvp: v \(leaf 0\) must be of shape \(3,\) like args, got tensor\(shape=\(2,\)",
    ):
        gl.hvp(lambda z: z.pow(3).sum(), x, torch.ones(2))
    with pytest.raises(
        TypeError,
        match=r"hvp: v \(leaf 0\) must be of dtype torch.float32 like args, got .*float64",
    ):
        gl.hvp(lambda z: z.pow(3).sum(), x, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hvp: v must be structured like args"):
        gl.hvp(lambda a, b: (a * b).sum(), (x, x), (x,))
    with pytest.raises(ValueError, match=r"jvp: v \(leaf 0\) must be of shape"):
        gl.jvp(torch.sin, x, torch.ones(4))
    with pytest.raises(
        ValueError,
        match=r"vjp: v \(leaf 0\) must be of shape .* like f's output, got tensor\(shape=\(4,\)",
    ):
        gl.vjp(torch.sin, x, torch.ones(4))
    with pytest.raises(
        ValueError,
        match=r"jacobian: chunk_size must be an int >= 1, got 0\. Pass None or a positive int",
    ):
        gl.jacobian(torch.sin, x, chunk_size=0)
    with pytest.raises(TypeError, match=r"functional: module must be a torch.nn.Module, got"):
        gl.functional(torch.sin)  # type: ignore[arg-type]
