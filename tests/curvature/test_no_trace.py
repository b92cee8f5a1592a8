"""Curvature calls leave no trace: a pending caller graph survives; unused parameters raise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradlab as gl

CALLS = {
    "trace": lambda f, m, **kw: gl.hessian_trace(f, m, samples=4, **kw),
    "trace-exact": lambda f, m, **kw: gl.hessian_trace(f, m, method="exact", **kw),
    "hutch++": lambda f, m, **kw: gl.hessian_trace(f, m, samples=6, method="hutch++", **kw),
    "diagonal": lambda f, m, **kw: gl.hessian_diagonal(f, m, samples=4, **kw),
    "diagonal-exact": lambda f, m, **kw: gl.hessian_diagonal(f, m, method="exact", **kw),
    "lanczos": lambda f, m, **kw: gl.hessian_eigenvalues(f, m, k=2, max_iter=10, **kw),
    "power": lambda f, m, **kw: gl.hessian_eigenvalues(f, m, method="power", max_iter=5, **kw),
    "spectrum": lambda f, m, **kw: gl.hessian_spectrum(f, m, probes=2, steps=4, **kw),
    "by-block": lambda f, m, **kw: gl.hessian_trace_by_block(f, m, samples=3, **kw),
    "operator": lambda f, m, **kw: gl.hessian_operator(f, m, **kw).matvec(
        torch.ones(sum(p.numel() for p in m.parameters()), dtype=torch.float64)
    ),
}


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("mode", ["eval", "train", None])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_pending_caller_graph_survives(name, mode):
    model, x = _bn_model()
    reference = copy.deepcopy(model)
    ref_loss = reference(x).pow(2).mean()
    ref_loss.backward()
    pending = model(x).pow(2).mean()  # train mode: saves the running statistics
    buffers = {k: (b, b._version, b.clone()) for k, b in model.named_buffers()}
    CALLS[name](lambda: model(x).pow(2).mean(), model, mode=mode)
    for k, b in model.named_buffers():
        obj, version, value = buffers[k]
        assert b is obj and b._version == version, k  # the very tensors, never written
        torch.testing.assert_close(b, value, rtol=0, atol=0)
    assert model.training and all(m.training for m in model.modules())
    pending.backward()  # would fail with "modified by an inplace operation"
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CALLS))
def test_unused_parameters_raise_graph_error_naming_them(name):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    spare = nn.Linear(2, 2).double()  # in the module, not in the loss
    holder = nn.ModuleDict({"net": model, "spare": spare})
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(gl.GraphError, match=r"does not use spare.weight, spare.bias; its Hessian"):
        CALLS[name](lambda: model(x).pow(2).mean(), holder)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, dtype=torch.float64, requires_grad=True)
    if name != "by-block":
        with pytest.raises(gl.GraphError, match=r"does not use params\[1\]; its Hessian"):
            CALLS[name](lambda: (w**4).sum(), [w, v])
