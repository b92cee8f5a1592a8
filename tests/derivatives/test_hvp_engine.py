"""The HVP engine's backward call, ``_hvp_engine.engine_grad``: ``torch.autograd.grad(...,
allow_unused=True)`` less torch's Python argument handling. It must give what
``torch.autograd.grad`` gives (values, graphs, ``None`` for unused inputs) and, for any argument
that handling exists for (a grad_output of another size, a non-scalar output without one, a
``__torch_function__`` subclass), hand the call to ``torch.autograd.grad`` (same result or same
error); without torch's private engine function it is ``torch.autograd.grad``."""

from __future__ import annotations

import pytest
import torch

import gradlab as gl
from gradlab._derivatives import _hvp_engine
from gradlab._derivatives._hvp_engine import engine_grad


def _graph(device, dtype=torch.float64):
    """A scalar of three leaves, the third unused, and the leaves."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g, dtype=dtype).to(device) for n in (3, 4, 2))
    a, b, c = (t.requires_grad_(True) for t in (a, b, c))
    value = (a.sin() * a).sum() * (b**3).sum()
    return value, [a, b, c]


def _assert_same(ours, torchs):
    assert len(ours) == len(torchs)
    for x, y in zip(ours, torchs):
        if y is None:
            assert x is None
            continue
        assert x.requires_grad == y.requires_grad
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same engine call: bit for bit


@pytest.mark.parametrize("private", [True, False], ids=["engine", "without-private-fn"])
@pytest.mark.parametrize("create_graph", [True, False])
def test_first_and_second_backward_equal_torch_autograd_grad(
    monkeypatch, device, create_graph, private
):
    value, leaves = _graph(device)
    calls = []
    real = torch.autograd.grad
    with monkeypatch.context() as m:
        if not private:
            m.setattr(_hvp_engine, "_RUN_BACKWARD", None)
        m.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        ours = engine_grad((value,), leaves, None, True, True)
    assert len(calls) == (0 if private else 1)  # the engine call, or torch.autograd.grad
    ref = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    _assert_same(ours, ref)
    used = [g for g in ref if g is not None]
    vs = [torch.full_like(g, 0.5) for g in used]
    with monkeypatch.context() as m:
        if not private:
            m.setattr(_hvp_engine, "_RUN_BACKWARD", None)
        m.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        second = engine_grad(used, leaves[:2], vs, True, create_graph)
    assert len(calls) == (0 if private else 2)
    expected = torch.autograd.grad(
        used, leaves[:2], vs, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    _assert_same(second, expected)


def test_a_grad_output_of_another_size_raises_torchs_error(device):
    """The engine alone would reduce a broadcastable grad_output (a (2, 3) one for a (3,)
    output) silently; torch.autograd.grad refuses it, and so does engine_grad (it hands it over)."""
    value, leaves = _graph(device)
    (ga, _, _) = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    wide = torch.ones(2, 3, dtype=ga.dtype, device=device)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        torch.autograd.grad([ga], [leaves[0]], [wide], allow_unused=True)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        engine_grad([ga], [leaves[0]], [wide], True, False)


def test_a_non_scalar_output_without_grad_outputs_raises_torchs_error(device):
    a = torch.ones(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        engine_grad((a * 2,), [a], None, False, False)


class _Tagged(torch.Tensor):
    """A tensor subclass with a ``__torch_function__`` that counts calls of torch.autograd.grad."""

    grads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad:
            cls.grads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_torch_function_subclass_goes_through_torch_autograd_grad():
    x = torch.randn(4, dtype=torch.float64).as_subclass(_Tagged).requires_grad_(True)
    _Tagged.grads = 0
    (g,) = engine_grad(((x**3).sum(),), [x], None, False, False)
    assert _Tagged.grads == 1  # torch.autograd.grad saw the subclass (its override ran)
    torch.testing.assert_close(g.as_subclass(torch.Tensor), 3 * x.detach() ** 2)


def test_hvp_agrees_with_and_without_the_private_engine_function(monkeypatch, device):
    """gl.hvp through engine_grad (both backward passes) against torch.func's forward-over-reverse
    HVP, with the engine call and with torch.autograd.grad in its place."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(5, generator=g, dtype=torch.float64).to(device)

    def f(z):
        return (z.sin() * z**2).sum()

    _, expected = torch.func.jvp(torch.func.grad(f), (x,), (v,))
    for private in (True, False):
        if not private:
            monkeypatch.setattr(_hvp_engine, "_RUN_BACKWARD", None)
        for strategy in ("auto", "double-backward"):
            value, hv = gl.hvp(f, x, v, strategy=strategy)
            torch.testing.assert_close(hv, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(value, f(x), rtol=1e-12, atol=1e-12)
            assert not hv.requires_grad and not value.requires_grad
