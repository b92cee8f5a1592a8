r"""Diagonal of the Hessian: Hutchinson-Bekas probes, or exact (Hessian backpropagation / HVPs)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from gradlab.curvature import _backprop
from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
    check_generator,
)
from gradlab.curvature._base import Pieces
from gradlab.curvature._estimators import DIAGONAL_METHODS, check_estimator, run_estimator
from gradlab.curvature._operator import build
from gradlab.curvature._progress import Progress

if TYPE_CHECKING:
    from gradlab.curvature._operator import HessianOperator

__all__ = ["hessian_diagonal", "hessian_exact_diagonal"]


def _reached(loss: torch.Tensor, params: list[torch.Tensor]) -> set[int]:
    """Indices of ``params`` that ``loss``'s graph reaches (a walk over its nodes, no compute)."""
    leaves = {id(p): i for i, p in enumerate(params) if p.grad_fn is None}
    inner = {p.grad_fn: i for i, p in enumerate(params) if p.grad_fn is not None}
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in inner:
            found.add(inner[node])
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaves:
            found.add(leaves[id(variable)])
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _unit_chunks(op: HessianOperator) -> list[tuple[int, int, int]]:
    """``(parameter, offset, count)`` chunks of unit vectors, never across two parameters."""
    return [
        (i, o, min(op._chunk, size - o))
        for i, size in enumerate(op.sizes)
        for o in range(0, size, op._chunk)
    ]


def _hvp_diagonal(op: HessianOperator, graph: Any, out: torch.Tensor, w: float) -> None:
    """Add ``w`` times the exact diagonal of one batch's Hessian into ``out`` (n products)."""
    for i, o, k in _unit_chunks(op):
        V: Pieces = [
            torch.zeros((k, *shape), dtype=op.dtype, device=op.device) for shape in op.shapes
        ]
        cols = torch.arange(k, device=op.device)
        V[i].view(k, -1)[cols, o + cols] = 1
        HV = op._batch_products(graph, V)
        entries = HV[i].reshape(k, -1)[cols, o + cols]
        out[op.offsets[i] + o : op.offsets[i] + o + k].add_(entries, alpha=w)
        op._count(k)


def hessian_exact_diagonal(op: HessianOperator) -> torch.Tensor:
    r"""The exact diagonal of the operator's Hessian, flat (length n).

    Per batch: first :func:`gradlab.curvature._backprop.exact_diagonal` (Hessian
    backpropagation, no products), and where it does not support the model (it returns
    ``None``), :math:`H_{jj} = e_j^\top H e_j` by n products. The batches are combined as
    :math:`\sum_b w_b \operatorname{diag} H_b / \sum_b w_b` and summed over ranks. Progress counts
    n per batch either way.
    """
    out = torch.zeros(op.n, dtype=op.dtype, device=op.device)
    if op._cache is not None:  # a kept graph: products on it
        graph, w = op._cache
        _hvp_diagonal(op, graph, out, w)
        op._finish([out])
        return out
    single = op._batches == 1
    for closure, w in op._closures():
        record: list[torch.Tensor] = []

        def recording(
            closure: Callable[[], torch.Tensor] = closure, record: list[torch.Tensor] = record
        ) -> torch.Tensor:
            loss = closure()
            record.append(loss)
            return loss

        diag = _backprop.exact_diagonal(recording, op.params)
        if diag is not None:
            reached = _reached(record[-1], op.params) if record else set(range(len(op.params)))
            for i in reached:
                op._used[i] += 1
            for i, d in enumerate(diag):
                out[op.offsets[i] : op.offsets[i + 1]].add_(d.reshape(-1).to(op.dtype), alpha=w)
            op._count(op.n)
        else:
            graph = op._graph_of(closure)  # a fresh forward: the recorded one may be spent
            if single:
                op._cache = (graph, w)
            _hvp_diagonal(op, graph, out, w)
        del record
    op._check_unused()
    op._finish([out])
    return out


def hessian_diagonal(
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    progress: ProgressArg = False,
) -> Any:
    r"""Diagonal of the Hessian of the loss w.r.t. ``params``.

    ``"hutchinson"``: :math:`\operatorname{diag} H \approx \frac1m \sum_i z_i \odot H z_i` with
    Rademacher probes (Bekas et al. 2007; unbiased, the error of entry j falls as
    :math:`\sqrt{\sum_{k\ne j} H_{jk}^2 / m}`); all probes are applied to each batch's graph in one
    pass over ``data``. ``"exact"``: Hessian backpropagation
    (:mod:`gradlab.curvature._backprop`, no Hessian-vector products) where it supports the model;
    otherwise :math:`H_{jj} = e_j^\top H e_j` by n products (batched for small n). The fast path
    takes parameters that sit in a chain of ``nn.Linear``/``nn.Conv2d`` layers (``nn.Flatten``,
    eval-mode ``nn.Dropout``, ``nn.Identity`` between them) and element-wise activations (ReLU,
    LeakyReLU, ELU, GELU, SiLU, Softplus, Tanh, Sigmoid, as modules or functions) followed by a
    loss separable over samples; the full list is in ``gradlab.curvature._backprop``.

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or ``loss_fn(batch)`` with ``data=``.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        samples: number of probes for ``"hutchinson"``.
        method: ``"hutchinson"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        data: batches; the diagonal is that of the dataset-mean loss (see
            :func:`gradlab.hessian_operator`).
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: sum over the ranks of the ``torch.distributed`` group (each passes its shard).
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts batches x Hessian-vector products (``samples``, or n for ``"exact"``).

    Returns:
        Structured like ``params``: a tensor for a tensor, a tuple for a sequence, a dict
        ``{name: diagonal}`` for a module; each entry has its parameter's shape.

    Raises:
        TypeError, ValueError: bad arguments (see :func:`gradlab.hessian_operator`).
        GraphError: the loss does not depend on ``params`` or on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gl.hessian_diagonal(lambda: (w**4).sum(), w, method="exact")
        tensor([12., 48.])
    """
    fn = "hessian_diagonal"
    entry = check_estimator(fn, DIAGONAL_METHODS, method, samples)
    gen = check_generator(fn, generator)
    prog = Progress(fn, progress)
    op, structure = build(
        fn,
        loss_fn,
        params,
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        progress=prog,
    )
    return op._unflatten(run_estimator(entry, op, samples, gen, prog), structure)
