"""Models, references and hook counters shared by the gradlab.hooks tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules import module as module_globals


class NaNBackward(torch.autograd.Function):
    """Identity forward; backward returns NaN (a planted bug in one layer's backward)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return torch.full_like(g, float("nan"))


class NaNLayer(nn.Module):
    """A parameter-free layer whose backward makes NaN when ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NaNBackward.apply(x) if self.armed else x.clone()


def mlp(inplace: bool = False, width: int = 8, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(5, width), nn.ReLU(inplace=inplace)]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU(inplace=inplace)]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers).double()


def cnn(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    ).double()


def input_for(model: nn.Sequential, device: torch.device, batch: int = 4) -> torch.Tensor:
    first = model[0]
    if isinstance(first, nn.Conv2d):
        return torch.randn(batch, first.in_channels, 8, 8, dtype=torch.float64, device=device)
    return torch.randn(batch, first.in_features, dtype=torch.float64, device=device)


def non_inplace_twin(model: nn.Sequential) -> nn.Sequential:
    """The same network with every in-place ReLU replaced by an out-of-place one."""
    twin = copy.deepcopy(model)
    for i, m in enumerate(twin):
        if isinstance(m, nn.ReLU):
            twin[i] = nn.ReLU()
    return twin


def run_layers(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward through an out-of-place Sequential by hand: (output, [input of layer i])."""
    inputs = []
    h = x
    for m in model:
        inputs.append(h)
        h = m(h)
    return h, inputs


def reference_grads(
    model: nn.Sequential, x: torch.Tensor, loss_fn=lambda y: y.pow(2).sum()
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """d loss / d (output of layer i) and d loss / d (input of layer i), by torch.autograd.grad."""
    twin = non_inplace_twin(model)
    x = x.detach().requires_grad_(True)
    out, inputs = run_layers(twin, x)
    outputs = [*inputs[1:], out]
    g_out = torch.autograd.grad(loss_fn(out), outputs, retain_graph=True)
    g_in = torch.autograd.grad(loss_fn(out), inputs)
    return list(g_out), list(g_in)


def global_tables() -> dict[str, dict]:  # type: ignore[type-arg]
    """Every process-wide hook table of ``torch.nn.modules.module`` (``_global_*`` dicts)."""
    tables = {
        n: t
        for n, t in vars(module_globals).items()
        if n.startswith("_global_") and isinstance(t, dict)
    }
    return tables


def global_snapshot() -> dict[str, dict]:  # type: ignore[type-arg]
    """A copy of every global hook table (keys and values), to compare before and after."""
    return {n: dict(t) for n, t in global_tables().items()}


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Number of hooks of every kind on every module and parameter, and process-wide ones."""
    counts: dict[str, tuple[int, ...]] = {"global": tuple(map(len, global_tables().values()))}
    for name, m in model.named_modules():
        counts[f"module {name}"] = (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
    for name, p in model.named_parameters():
        counts[f"param {name}"] = (
            len(p._backward_hooks or {}),
            len(getattr(p, "_post_accumulate_grad_hooks", None) or {}),
        )
    return counts
