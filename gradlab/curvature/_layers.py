r"""One forward pass seen layer by layer: inputs and backpropagated factor columns per layer.

KFAC and the exact GGN diagonal need the same two things of each ``nn.Linear`` / ``nn.Conv2d``
layer :math:`s = W a`: its inputs :math:`a` (a conv's unfolded patches) and the gradients
:math:`g_j = \partial (f^\top \phi_j) / \partial s` of the output-matrix factors
:math:`\Phi = [\phi_1, \dots, \phi_m]` (the loss Hessian's square root or sampled gradients).
:func:`layer_pass` runs the model once with forward hooks and backpropagates all ``m`` columns
in one batched backward that stops at the layer outputs (no parameter gradients);
:func:`input_rows` and :func:`output_rows` lay them out as ``(N, positions, features)`` rows
whose products give the per-sample weight gradients :math:`\sum_r g_{nr} a_{nr}^\top`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradlab.per_sample._conv import unfold

__all__ = [
    "SUPPORTED",
    "capture",
    "input_columns",
    "input_rows",
    "layer_problem",
    "output_columns",
    "output_grads",
    "output_rows",
    "patches",
]

SUPPORTED = (nn.Linear, nn.Conv2d)


def layer_problem(module: nn.Module) -> str | None:
    """Why ``module`` has no closed-form rule here (None: it has one)."""
    if not isinstance(module, SUPPORTED):
        return f"a {type(module).__name__}"
    if isinstance(module, nn.Conv2d) and (
        module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros"
    ):
        return "a Conv2d with groups != 1, string padding or padding_mode != 'zeros'"
    return None


@contextlib.contextmanager
def capture(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Any, Any]]]]:
    """Record each layer's (input, output) per call; the hooks are removed on exit."""
    seen: dict[str, list[tuple[Any, Any]]] = {name: [] for name in layers}
    handles = []
    try:
        for name, module in layers.items():

            def hook(m: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
                seen[name].append((inputs[0].detach(), output))

            handles.append(module.register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


def output_grads(
    out: torch.Tensor, outputs: list[torch.Tensor], Phi: torch.Tensor, *, batched: bool
) -> list[list[torch.Tensor]]:
    """The ``m`` columns of ``Phi`` backpropagated to each tensor in ``outputs``.

    Per output, a list of chunks ``(k, *output.shape)`` whose k add up to ``m``: one chunk from
    one vmapped backward (``batched``), or ``m`` chunks of one column from a backward each (a
    convolution's batching rule loops over the columns anyway, and stacking its results costs
    a copy); an operation without a batching rule also gives single columns. An output outside
    the graph of ``out`` gets zeros.
    """
    m = Phi.shape[0]
    live = [i for i, o in enumerate(outputs) if o.requires_grad and out.requires_grad]
    grads: list[list[torch.Tensor]] = [
        [] if i in live else [Phi.new_zeros((m, *o.shape))] for i, o in enumerate(outputs)
    ]
    if not live:
        return grads
    wrt = [outputs[i] for i in live]

    def column(j: int) -> None:
        gs = torch.autograd.grad(
            out, wrt, Phi[j], retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for i, g in zip(live, gs):
            grads[i].append(g.unsqueeze(0))

    if m == 1 or not batched:
        for j in range(m):
            column(j)
        return grads
    try:
        found = torch.autograd.grad(
            out,
            wrt,
            Phi,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    except RuntimeError:  # an op without a batching rule: one column at a time
        for j in range(m):
            column(j)
        return grads
    for i, g in zip(live, found):
        grads[i].append(g)
    return grads


def patches(
    a: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """``F.unfold(a, kernel_size, dilation, padding, stride)``, ``(N, C * kh * kw, positions)``:
    the per-sample rules' patches (:func:`gradlab.per_sample._conv.unfold`: sliding-window views
    of the zero-padded input and one copy, faster than ``F.unfold`` on CPU)."""
    pad = [p for p in reversed(padding) for _ in range(2)]  # F.pad order: last dimension first
    return unfold(a, tuple(kernel_size), tuple(stride), tuple(dilation), pad, "zeros")


def _unfold(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """``(N, C_in * kh * kw, positions)`` patches, ordered like ``weight.reshape(C_out, -1)``."""
    padding = module.padding
    assert not isinstance(padding, str)  # refused by layer_problem
    return patches(a, module.kernel_size, module.dilation, padding, module.stride)


def input_rows(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``(N, positions, d_in)``: a Linear's inputs, or a Conv2d's patches."""
    if isinstance(module, nn.Conv2d):
        return _unfold(module, a).transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def input_columns(module: nn.Module, a: torch.Tensor, reduce: bool) -> tuple[torch.Tensor, int]:
    """``(d_in, M)`` input vectors as columns and the number of positions R they came from:
    every sample and position (``M = N R``), or (``reduce``) each sample's mean over its
    positions (``M = N``). Laid out for the Gram matrix ``cols @ cols.T``."""
    if isinstance(module, nn.Conv2d):
        cols = _unfold(module, a)  # (N, d_in, R)
        if reduce:
            return cols.mean(2).T, cols.shape[2]
        return cols.transpose(0, 1).reshape(cols.shape[1], -1), cols.shape[2]
    rows = a.reshape(a.shape[0], -1, a.shape[-1])
    if reduce:
        return rows.mean(1).T, rows.shape[1]
    return rows.reshape(-1, rows.shape[-1]).T, rows.shape[1]


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """``(m, N, positions, d_out)`` from the layer-output gradients ``(m, N, ...)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def output_columns(module: nn.Module, g: torch.Tensor, reduce: bool) -> torch.Tensor:
    """``(d_out, M)`` layer-output gradients ``(m, N, ...)`` as columns: every column, sample
    and position, or (``reduce``) each column and sample summed over positions."""
    if isinstance(module, nn.Conv2d):
        if reduce:
            return g.sum((3, 4)).reshape(-1, g.shape[2]).T
        return g.movedim(2, 0).reshape(g.shape[2], -1)
    if reduce:
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).sum(2).reshape(-1, g.shape[-1]).T
    return g.reshape(-1, g.shape[-1]).T
