"""nn.Embedding: per-sample gradients, ghost norms and dot products from the indices.

With indices ``k_t`` and output gradients ``d_t`` of one sample, the weight gradient has row
``n`` equal to ``sum_{t: k_t = n} d_t`` (zero at ``padding_idx``). Its squared norm without
forming the ``(num_embeddings, D)`` matrix is ``sum_{t,t'} [k_t = k_t'] (d_t . d_t')``, used
where ``T^2 < num_embeddings``; the dot product with ``V`` is ``sum_t V[k_t] . d_t``.
``scale_grad_by_freq`` scales by the frequency of each index in the whole batch, which couples
the samples: refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradlab.per_sample._registry import Names, Rule, register


def _check(module: Any) -> None:
    if module.scale_grad_by_freq:  # type: ignore[union-attr]
        raise ValueError(
            f"PerSampleGradients: model has an Embedding with scale_grad_by_freq=True "
            f"({module!r}), which scales each gradient by the frequency of its index in the "
            f"whole batch and so couples the samples. Set scale_grad_by_freq=False, or use "
            f"per_sample_grads on a function you define."
        )


def _flat(module: Any, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b = a.shape[0]
    idx = a.reshape(b, -1)
    dd = d.reshape(b, idx.shape[1], -1)
    pad = module.padding_idx  # type: ignore[union-attr]
    if pad is not None:
        dd = dd * (idx != pad).unsqueeze(-1).to(dd.dtype)
    return idx, dd


def _grad(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    idx, dd = _flat(module, a, d)
    w = module.weight  # type: ignore[union-attr]
    out = torch.zeros(idx.shape[0], *w.shape, dtype=dd.dtype, device=dd.device)
    out.scatter_add_(1, idx.unsqueeze(-1).expand_as(dd), dd)
    return {"weight": out}


def _norm_sq(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    idx, dd = _flat(module, a, d)
    t = idx.shape[1]
    if t * t >= module.weight.shape[0]:  # type: ignore[union-attr]
        return {"weight": _grad(module, a, d, names)["weight"].flatten(1).square().sum(1)}
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(dd.dtype)
    return {"weight": (same * (dd @ dd.transpose(1, 2))).sum((1, 2))}


def _dot(
    module: Any, a: torch.Tensor, d: torch.Tensor, v: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    idx, dd = _flat(module, a, d)
    return (v["weight"].to(dd.dtype)[idx] * dd).sum((1, 2))


def _dot_mean(module: Any, a: torch.Tensor, d: torch.Tensor, names: Names) -> dict:
    """``g_i . m``: ``m`` (the table's batch gradient over ``B``) by one scatter-add, then
    :func:`_dot`; never ``B`` copies of the table."""
    idx, dd = _flat(module, a, d)
    w = module.weight  # type: ignore[union-attr]
    m = torch.zeros(w.shape, dtype=dd.dtype, device=dd.device)
    m.index_add_(0, idx.reshape(-1), dd.reshape(-1, dd.shape[-1]))
    return {"weight": (m[idx] * dd).sum((1, 2)) / idx.shape[0]}


register(
    nn.Embedding,
    Rule(grad=_grad, norm_sq=_norm_sq, dot=_dot, check=_check, dot_mean=_dot_mean),
)
