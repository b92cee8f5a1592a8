r"""Diagonal of the Hessian: Hutchinson-Bekas probes, or exact (Hessian backpropagation / HVPs)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
)
from gradlab.curvature._estimators import DIAGONAL_METHODS, check_estimator, run_estimator
from gradlab.curvature._operator import front

if TYPE_CHECKING:
    pass

__all__ = ["hessian_diagonal"]


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
    eval-mode ``nn.Dropout``, ``nn.Identity``, ``nn.MaxPool2d``, ``nn.AvgPool2d`` and their
    adaptive forms between them) and element-wise activations (ReLU,
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
            counts batches x Hessian-vector products (``samples``, or n for ``"exact"``; a batch
            done by Hessian backpropagation runs none and takes its n off the total).

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
    f = front(fn, loss_fn, params, generator, mode, data, batch_weight, distributed, progress)
    return f.op._unflatten(
        run_estimator(entry, f.op, samples, f.generator, f.progress), f.structure
    )
