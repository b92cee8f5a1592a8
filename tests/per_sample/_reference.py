"""Independent references for the per-sample tests: ``vmap(grad)`` of the per-sample loss, or a
loop of ``torch.autograd.grad`` over single samples, and the statistics written out."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_grads(
    model: nn.Module,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loop: bool = False,
) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}``: the gradient of ``loss_fn(model(x_i), y_i)`` (a batch of one)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not loop:

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    names = list(params)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    live = dict(model.named_parameters())
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, [live[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            rows[n].append(torch.zeros_like(live[n]) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def stats_of(g: dict[str, torch.Tensor]) -> dict[str, object]:
    """The statistics written out from the per-sample gradients."""
    norm_by_param = {n: t.flatten(1).norm(dim=1) for n, t in g.items()}
    return {
        "norm": torch.stack([v.square() for v in norm_by_param.values()]).sum(0).sqrt(),
        "norm_by_param": norm_by_param,
        "grad": g,
        "sum_sq": {n: t.square().sum(0) for n, t in g.items()},
        "variance": {n: ((t - t.mean(0)) ** 2).mean(0) for n, t in g.items()},
    }


def dot_of(g: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((g[n] * v[n]).flatten(1).sum(1) for n in g)  # type: ignore[return-value]


def dot_mean_of(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: (B,)}``: ``g_i . m`` per parameter, ``m = (1/B) sum_k g_k``, written out."""
    return {n: (t * t.mean(0)).flatten(1).sum(1) for n, t in g.items()}


class WeightUsedOutside(nn.Module):
    """A module whose ``lin.weight`` is used by its own code, never through ``lin``'s forward:
    a per-sample engine must refuse it (its gradient arrives without a call of its module)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.lin.weight.T
