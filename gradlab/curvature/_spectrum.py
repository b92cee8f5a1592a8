r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
)
from gradlab.curvature._estimators import check_spectrum, run_spectrum
from gradlab.curvature._operator import front
from gradlab.curvature._results import Spectrum

__all__ = ["Spectrum", "hessian_spectrum"]


def hessian_spectrum(
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    probes: int = 10,
    steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    progress: ProgressArg = False,
) -> Spectrum:
    r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

    For each of ``probes`` random unit vectors :math:`v` (Rademacher, scaled), ``steps`` Lanczos
    steps give a Gauss quadrature :math:`v^\top f(H) v \approx \sum_i w_i f(\theta_i)` with nodes
    :math:`\theta_i` (Ritz values) and weights :math:`w_i` (squared first components of the
    eigenvectors of the tridiagonal matrix; they sum to 1). The density is the average over probes
    of :math:`\sum_i w_i\, \mathcal N(t; \theta_i, \sigma^2)` on a grid spanning the nodes
    :math:`\pm 6\sigma`, renormalised so its trapezoidal integral is exactly 1. Its mean
    :math:`\int t\,\rho(t)\,dt` estimates :math:`\operatorname{tr}(H)/n` (the quadrature is exact
    for :math:`f(t) = t`: each probe contributes :math:`v^\top H v`). The probes run together:
    each Lanczos step applies the Hessian to all of them in one pass over ``data``.

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or ``loss_fn(batch)`` with ``data=``.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        probes: number of random start vectors.
        steps: Lanczos steps per probe (capped at n).
        grid_size: number of grid points.
        sigma: Gaussian smoothing width (default: 1% of the node range, or 1e-3 if that is 0).
        generator: a ``torch.Generator`` or an int seed.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        data: batches; the Hessian is that of the dataset-mean loss.
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: sum over the ranks of the ``torch.distributed`` group (each passes its shard).
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts batches x Hessian-vector products (``probes * steps``).

    Returns:
        :class:`Spectrum` ``(grid, density, nodes, weights)``.

    Raises:
        TypeError, ValueError: bad arguments (see :func:`gradlab.hessian_operator`).
        GraphError: the loss does not depend on ``params`` or on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> s = gl.hessian_spectrum(lambda: (w**4).sum(), w, probes=4, generator=0)
        >>> round(torch.trapezoid(s.density, s.grid).item(), 4)
        1.0
    """
    fn = "hessian_spectrum"
    check_spectrum(fn, probes, steps, grid_size, sigma)
    f = front(fn, loss_fn, params, generator, mode, data, batch_weight, distributed, progress)
    return run_spectrum(f.op, probes, steps, grid_size, sigma, f.generator, f.progress)
