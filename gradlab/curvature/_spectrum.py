r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
    check_generator,
    check_positive,
)
from gradlab.curvature._distributed import shared_seed
from gradlab.curvature._operator import HessianOperator, build
from gradlab.curvature._progress import Progress

__all__ = ["Spectrum", "hessian_spectrum"]


class Spectrum(NamedTuple):
    """Spectral density estimate by stochastic Lanczos quadrature.

    ``grid`` and ``density`` (same length; ``torch.trapezoid(density, grid) == 1``), and the
    quadrature the density is smoothed from: ``nodes`` (Ritz values) and ``weights`` of shape
    ``(probes, steps)``, each probe's weights summing to 1.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor

    def __repr__(self) -> str:
        """Shapes and the range, never whole tensors."""
        probes, steps = tuple(self.weights.shape[-2:]) if self.weights.dim() >= 2 else (1, 0)
        lo, hi = (float(self.grid.min()), float(self.grid.max())) if self.grid.numel() else (0, 0)
        return (
            f"Spectrum(grid: {self.grid.numel()} points on [{lo:.4g}, {hi:.4g}], "
            f"nodes: {probes} probes x {steps} steps)"
        )


def slq_nodes(op: HessianOperator, V0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos on all probes (rows of ``V0``) at once; Gauss quadrature nodes and weights."""
    P = V0.shape[0]
    Q = torch.zeros(P, m, op.n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(P, m, dtype=torch.float64)
    beta = torch.zeros(P, m, dtype=torch.float64)
    v = V0 / V0.norm(dim=1, keepdim=True)  # (P, n)
    alive = torch.ones(P, dtype=torch.bool, device=op.device)
    for j in range(m):
        Q[:, j] = v
        w = op.rows_products(v)  # (P, n)
        a = (w * v).sum(1)
        alpha[:, j] = a.double().cpu()
        basis = Q[:, : j + 1]  # (P, j+1, n)
        for _ in range(2):
            w = w - torch.einsum("pk,pkn->pn", torch.einsum("pkn,pn->pk", basis, w), basis)
        b = w.norm(dim=1)
        if j == m - 1:
            break
        # a probe whose Krylov space is exhausted stops: zero coupling, zero further vectors
        alive = alive & (b > 1e-10 * a.abs().clamp_min(1.0))
        b = torch.where(alive, b, torch.zeros_like(b))
        beta[:, j] = b.double().cpu()
        v = torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w))
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1)
    T = T + torch.diag_embed(beta[:, : m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[:, 0, :] ** 2


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
    check_positive(fn, "probes", probes)
    check_positive(fn, "steps", steps)
    check_positive(fn, "grid_size", grid_size, 2)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"{fn}: sigma={sigma!r}; pass a positive width or None")
    gen = check_generator(fn, generator)
    prog = Progress(fn, progress)
    op, _ = build(
        fn,
        loss_fn,
        params,
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        progress=prog,
    )
    m = min(steps, op.n)
    seed = shared_seed(gen, op.distributed)
    with prog.run(probes * m, op.batches):
        nodes, weights = slq_nodes(op, op.random_rows(probes, seed), m)
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = sigma if sigma is not None else (0.01 * (hi - lo) or 1e-3)
    grid = torch.linspace(lo - 6 * width, hi + 6 * width, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / width) ** 2)
    density = (kernel * weights.reshape(1, -1)).sum(1) / (probes * width * math.sqrt(2 * math.pi))
    density = density / torch.trapezoid(density, grid)
    dtype = op.dtype
    return Spectrum(grid.to(dtype), density.to(dtype), nodes.to(dtype), weights.to(dtype))
