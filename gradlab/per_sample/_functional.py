"""per_sample_grads: the functional path, ``vmap(grad(f))`` over the samples of a batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import grad, vmap

__all__ = ["per_sample_grads"]

_FN = "per_sample_grads"


def per_sample_grads(
    f: Callable[..., torch.Tensor],
    params: Mapping[str, torch.Tensor],
    *batch: torch.Tensor,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    r"""Per-sample gradients ``{name: (B, *p.shape)}`` of any loss function, by ``torch.func``.

    ``f(params, *batch)`` computes the loss of a batch from a dict of parameters (e.g. with
    :func:`torch.func.functional_call`). It is called on each sample alone, as a batch of one
    (every tensor of ``batch`` sliced on dimension 0, keeping a batch dimension of size one),
    so the same loss function serves for whole batches; the result for sample ``i`` is
    :math:`g_i = \nabla_\theta f(\theta, x_{i:i+1}, \dots)`. Samples are independent by
    construction (BatchNorm here sees a batch of one). Memory ``O(B P)`` (``O(chunk_size P)``
    of intermediates with ``chunk_size``); for statistics of a model's per-sample gradients
    without storing them see :class:`~gradlab.per_sample.PerSampleGradients`.

    Args:
        f: ``f(params, *batch) -> scalar`` loss.
        params: ``{name: tensor}`` of the parameters to differentiate (detached copies are used;
            nothing passed in is modified).
        *batch: tensors with the samples on dimension 0, all of the same size ``B``.
        chunk_size: samples vectorised at once (``vmap``'s ``chunk_size``); ``None``: all.

    Returns:
        ``{name: (B, *params[name].shape)}``.

    Raises:
        TypeError: ``params`` is not a dict of tensors or a ``batch`` item is not a tensor.
        ValueError: no batch, batch sizes differ, or ``chunk_size`` is not positive.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.func import functional_call
        >>> from gradlab.per_sample import per_sample_grads
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> def loss(p, x, y):
        ...     return nn.functional.mse_loss(functional_call(model, p, (x,)), y)
        >>> g = per_sample_grads(loss, dict(model.named_parameters()), torch.randn(4, 3),
        ...                      torch.randn(4, 2))
        >>> {n: tuple(t.shape) for n, t in g.items()}
        {'weight': (4, 2, 3), 'bias': (4, 2)}
    """
    if not isinstance(params, Mapping) or not all(
        isinstance(p, torch.Tensor) for p in params.values()
    ):
        raise TypeError(
            f"{_FN}: params must be a dict {{name: tensor}}, got {type(params).__name__}. For a "
            f"model pass dict(model.named_parameters())"
        )
    if not batch:
        raise ValueError(f"{_FN}: batch is empty; pass the batch tensors after params")
    sizes: list[Any] = []
    for k, t in enumerate(batch):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{_FN}: batch[{k}] must be a tensor with the samples on dimension 0, got "
                f"{type(t).__name__}. Close over non-tensor arguments in f"
            )
        sizes.append(t.shape[0] if t.dim() else None)
    if None in sizes or len(set(sizes)) != 1:
        raise ValueError(
            f"{_FN}: every batch tensor must have the samples on dimension 0, all of one size; "
            f"got sizes {sizes}. Pass tensors of shape (B, ...)"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_FN}: chunk_size must be a positive int or None, got {chunk_size!r}")
    detached = {n: p.detach() for n, p in params.items()}

    def one(p: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        return f(p, *(s.unsqueeze(0) for s in sample))

    in_dims = (None,) + (0,) * len(batch)
    return vmap(grad(one), in_dims=in_dims, chunk_size=chunk_size)(detached, *batch)
