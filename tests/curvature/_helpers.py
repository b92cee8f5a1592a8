"""Shared models and checks for the curvature tests: a small BatchNorm MLP and its dense Hessian."""

from __future__ import annotations

import torch
from torch import nn

import gradlab as gl


def _setup(device, train: bool = False):
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
        .double()
        .to(device)
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train(train)
    x = torch.randn(16, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 2, (16,), device=device)

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    # dense reference: the same loss as a function of the parameters
    fm = gl.functional(model, batchnorm="batch-stats")
    H = dense_hessian(model, lambda params: nn.functional.cross_entropy(fm(params, x), y))
    return model, loss_fn, H


def dense_hessian(model, loss_of_params):
    """The dense Hessian of ``loss_of_params({name: tensor})`` at ``model``'s parameters, over
    the flat vector of its parameters in order (``torch.func.hessian``)."""
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def flat_loss(theta):
        pieces = torch.split(theta, sizes)
        return loss_of_params({n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)})

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return torch.func.hessian(flat_loss)(theta)


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def _assert_untouched(model, snap):
    state, flags = snap
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def dataset_problem(n: int = 16, seed: int = 0, *, dense: bool = True):
    """A float64 MLP, a dataset of n samples, ``loss_fn(batch)`` and the dense full-data Hessian.

    Returns ``(model, x, y, loss_fn, H, flat_loss)``: ``loss_fn((x, y))`` is the mean
    cross-entropy on a batch, ``H`` the dense Hessian of the mean loss over all n samples w.r.t.
    the flattened parameters (``None`` unless ``dense``), ``flat_loss(theta, x, y)`` the loss as a
    function of them.
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)

    def loss_fn(batch):
        xb, yb = batch
        return nn.functional.cross_entropy(model(xb), yb)

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def flat_loss(theta, xb, yb):
        pieces = torch.split(theta, sizes)
        params = {k: p.reshape(s) for k, p, s in zip(names, pieces, shapes)}
        out = torch.func.functional_call(model, params, (xb,))
        return nn.functional.cross_entropy(out, yb)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    H = torch.func.hessian(flat_loss)(theta, x, y) if dense else None
    return model, x, y, loss_fn, H, flat_loss


def count_products(monkeypatch, *, refuse: bool = False) -> list[int]:
    """Count the Hessian-vector products the operator runs: the vectors of each backward
    (every product goes through ``GradGraph.hvp``). ``refuse=True``: any product fails."""
    from gradlab._derivatives._hvp_engine import GradGraph

    real_hvp = GradGraph.hvp
    vectors: list[int] = []

    def hvp(self, vs, *, retain_graph=True, create_graph=False, batched=False):
        if refuse:
            raise AssertionError("a Hessian-vector product ran")
        vectors.append(vs[0].shape[0] if batched else 1)
        return real_hvp(
            self, vs, retain_graph=retain_graph, create_graph=create_graph, batched=batched
        )

    monkeypatch.setattr(GradGraph, "hvp", hvp)
    return vectors
