r"""The exact Hessian diagonal of a :class:`~gradlab.curvature.HessianOperator`.

Hessian backpropagation where it supports the model, else n Hessian-vector products. Apart from
:mod:`gradlab.curvature._diagonal` (the estimators' front end) so that the operator can import it
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradlab.curvature import _backprop
from gradlab.curvature._base import Pieces

# The operator is a gradlab.curvature.HessianOperator, typed Any here: importing its module, even
# only for type checking, would make an import cycle (it calls hessian_exact_diagonal).
HessianOperator = Any

__all__ = ["hessian_exact_diagonal"]


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
    the products that run: n per batch on the product path, none on the backprop path (its n are
    taken off the total).
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
            op._skip(op.n)  # none of the n products counted for this batch ran
        else:
            graph = op._graph_of(closure)  # a fresh forward: the recorded one may be spent
            if single:
                op._cache = (graph, w)
            _hvp_diagonal(op, graph, out, w)
        del record
    op._check_unused()
    op._finish([out])
    return out
