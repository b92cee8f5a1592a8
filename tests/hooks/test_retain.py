"""retain_grads against retain_grad."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from gradlab.hooks import retain_grads
from tests.hooks._helpers import input_for, mlp


def _grad_attr(t: torch.Tensor) -> torch.Tensor | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading .grad of a non-leaf warns
        return t.grad


def test_tutorial_example(device: torch.device) -> None:
    # y1 = x**2 = 4 and y2 = -x**2 = -4 at x = 2; L = y1 * y2: dL/dy1 = y2, dL/dy2 = y1
    x = torch.tensor(2.0, device=device, requires_grad=True)
    y1 = x**2
    y2 = -(x**2)
    with retain_grads(y1, y2) as grads:
        (y1 * y2).backward()
    assert grads[0].item() == -4.0 and grads[1].item() == 4.0
    assert _grad_attr(y1) is None and _grad_attr(y2) is None  # nothing left on the tensors
    assert not y1.retains_grad and not y1._backward_hooks
    assert x.grad.item() == -32.0  # 4 x^3 * (-1): the leaf still gets its gradient


def test_matches_retain_grad_with_accumulation(device: torch.device) -> None:
    model = mlp(inplace=False, depth=4).to(device)
    x = input_for(model, device)
    ref_acts = []
    h = x
    for m in model:
        h = m(h)
        h.retain_grad()
        ref_acts.append(h)
    h.pow(2).sum().backward(retain_graph=True)
    h.sum().backward()  # .grad accumulates over the two passes
    acts = []
    h = x
    for m in model:
        h = m(h)
        acts.append(h)
    with retain_grads(*acts) as grads:
        h.pow(2).sum().backward(retain_graph=True)
        h.sum().backward()
    assert len(grads) == len(acts)
    for g, ref in zip(grads, ref_acts):
        torch.testing.assert_close(g, ref.grad, rtol=1e-12, atol=0)
    assert all(_grad_attr(a) is None for a in acts)


def test_unreached_tensor_is_none(device: torch.device) -> None:
    x = torch.randn(3, device=device, requires_grad=True)
    a, b = x * 2, x * 3
    with retain_grads(a, b) as grads:
        a.sum().backward()
    assert grads[1] is None and torch.equal(grads[0], torch.ones_like(a))
    assert grads[:] == (grads[0], None)


def test_create_graph_stores_detached(device: torch.device) -> None:
    x = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    y = x.sin()
    with retain_grads(y) as grads:
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(grads[0], 2 * y.detach())
    assert grads[0].grad_fn is None and not grads[0].requires_grad
    assert g.requires_grad


def test_hooks_removed_after_exit_and_exception(device: torch.device) -> None:
    x = torch.randn(3, device=device, requires_grad=True)
    y = x * 2
    with retain_grads(y) as grads:
        y.sum().backward(retain_graph=True)
    y.sum().backward(retain_graph=True)  # after exit: not recorded
    torch.testing.assert_close(grads[0], torch.ones_like(y))
    assert not y._backward_hooks
    with pytest.raises(RuntimeError, match="boom"), retain_grads(y):
        raise RuntimeError("boom")
    assert not y._backward_hooks


def test_nothing_kept_alive(device: torch.device) -> None:
    x = torch.randn(3, device=device, requires_grad=True)
    y = x * 2
    with retain_grads(y) as grads:
        y.sum().backward()
    y_ref, g_ref = weakref.ref(y), weakref.ref(grads[0])
    del y
    gc.collect()
    assert y_ref() is None  # the result does not keep the tensor alive
    del grads
    assert g_ref() is None


def test_bad_arguments() -> None:
    with pytest.raises(
        TypeError, match=r"retain_grads: argument 1 must be a torch\.Tensor, got \[1\.0\]\. Pass"
    ):
        retain_grads(torch.ones(1, requires_grad=True), [1.0])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"retain_grads: argument 0 \(shape \(2,\)\) does not require grad"
    ):
        retain_grads(torch.ones(2))
    with pytest.raises(ValueError, match="retain_grads: tensors is empty"):
        retain_grads()


def test_a_used_context_cannot_be_entered_again() -> None:
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    grads = retain_grads(y)
    with grads:
        with pytest.raises(RuntimeError, match="retain_grads: this context was already used"):
            grads.__enter__()
        y.sum().backward()
    with pytest.raises(RuntimeError, match="retain_grads: this context was already used"):
        grads.__enter__()
    assert torch.equal(grads[0], torch.ones(3))
