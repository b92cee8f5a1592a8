"""The Hessian operator's product path: Hutchinson's forms, the direct engine call, spent graphs."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import gradlab as gl
from gradlab._derivatives._hvp_engine import GradGraph
from gradlab.curvature import _operator
from gradlab.curvature._hutchinson import hutchinson_trace
from gradlab.curvature._probes import rademacher_rows
from tests.curvature._helpers import dense_hessian


def _problem(device):
    """A float64 tanh MLP on 12 samples, its loss per batch, and the dense full-data Hessian."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    model.to(device)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (12,), generator=g).to(device)

    def loss_fn(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    H = dense_hessian(
        model,
        lambda params: nn.functional.cross_entropy(
            torch.func.functional_call(model, params, (x,)), y
        ),
    )
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]  # equal sizes: same mean
    return model, x, y, loss_fn, batches, H


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
@pytest.mark.parametrize("data", [False, True], ids=["one-batch", "data"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "block"])
def test_hutchinson_trace_is_the_mean_of_its_probes_quadratic_forms(
    batched, data, masked, device, monkeypatch
):
    # the estimate, rebuilt from the same probes and the dense Hessian: mean_i z_i^T H z_i
    if not batched:
        monkeypatch.setattr(_operator, "BATCHED_MAX_N", 0)
    model, x, y, loss_fn, batches, H = _problem(device)
    if data:
        op = gl.hessian_operator(loss_fn, model, data=batches)
    else:
        op = gl.hessian_operator(lambda: loss_fn((x, y)), model)
    assert op._batched is batched
    n, m, seed = H.shape[0], 7, 123
    mask = None
    if masked:
        mask = torch.zeros(n, dtype=torch.float64, device=device)
        mask[op.offsets[0] : op.offsets[2]] = 1  # the first layer's block
    chunks, rows = rademacher_rows(op, m, seed)
    Z = torch.cat([rows(c) for c in range(chunks)])
    if mask is not None:
        Z = Z * mask
    expected = ((Z @ H) * Z).sum(1).mean()
    for _ in range(2):  # the operator (its kept graph) is reusable after an estimator's sweep
        got = hutchinson_trace(op, m, seed, rows=mask)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    v = torch.randn(n, dtype=torch.float64, device=device)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


def test_the_direct_product_equals_autograd_grad(device):
    model, x, y, loss_fn, _, H = _problem(device)
    graph = GradGraph(loss_fn((x, y)), list(model.parameters()))
    vs = [torch.randn_like(p) for p in model.parameters()]
    ref = torch.autograd.grad(graph.grads, graph.inputs, vs, retain_graph=True)
    got = graph.hvp(vs)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))  # the same engine call, bit for bit
    flat = torch.cat([h.flatten() for h in got])
    torch.testing.assert_close(flat, H @ torch.cat([v.flatten() for v in vs]), rtol=1e-10, atol=0)
    got = graph.hvp(vs, retain_graph=False)  # the last one frees the graph
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        graph.hvp(vs)


class _Tagged(torch.Tensor):
    """A tensor subclass with a ``__torch_function__`` that counts the calls it sees."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_pieces_that_override_torch_function_go_through_autograd_grad(device):
    model, x, y, loss_fn, _, _ = _problem(device)
    graph = GradGraph(loss_fn((x, y)), list(model.parameters()))
    vs = [torch.randn_like(p) for p in model.parameters()]
    ref = graph.hvp(vs)
    _Tagged.calls = 0
    got = graph.hvp([v.as_subclass(_Tagged) for v in vs])
    assert _Tagged.calls > 0  # autograd.grad dispatched to the subclass
    assert all(torch.equal(torch.Tensor(a), b) for a, b in zip(got, ref))


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
def test_each_batch_graph_is_freed_by_its_last_product(batched, monkeypatch):
    # the forward's saved tensors are tracked (packed into boxes, held by the graph only): when
    # the next batch's loss runs, the previous batch's graph has freed them (its last product ran
    # with retain_graph=False), so two batch graphs are never alive together
    if not batched:
        monkeypatch.setattr(_operator, "BATCHED_MAX_N", 0)
    model, x, y, loss_fn, batches, H = _problem("cpu")
    boxes: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def pack(t):
        box = _Box(t.detach())  # (no grad_fn: a box must not keep its own graph alive)
        boxes.append(weakref.ref(box))
        return box

    def tracked(batch):
        alive_at_start.append(sum(b() is not None for b in boxes))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            return loss_fn(batch)

    m = 5
    est = gl.hessian_trace(tracked, model, data=batches, samples=m, generator=0)
    assert len(alive_at_start) == len(batches) and boxes
    # a vmapped product spends a graph once one has run on the model (from the second batch)
    assert alive_at_start[2 if batched else 1 :] == [0] * (len(batches) - (2 if batched else 1))
    # the same estimate as on one batch of all the data (the probes do not depend on batching)
    full = gl.hessian_trace(lambda: loss_fn((x, y)), model, samples=m, generator=0)
    torch.testing.assert_close(est, full, rtol=1e-10, atol=1e-12)
    # a user's operator over several batches: its batch graphs are spent the same way
    alive_at_start.clear()
    op = gl.hessian_operator(tracked, model, data=batches)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)  # rebuilt per pass
    assert alive_at_start[1:] == [0] * (len(alive_at_start) - 1)
