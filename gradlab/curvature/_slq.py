r"""Spectral density by stochastic Lanczos quadrature (SLQ): all probes in one sweep per step."""

from __future__ import annotations

import math

import torch

from gradlab.curvature._base import CurvatureOperator
from gradlab.curvature._results import Spectrum

__all__ = ["slq_density", "slq_nodes"]


def slq_nodes(op: CurvatureOperator, V0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos on all probes (rows of ``V0``) at once; Gauss quadrature nodes and weights."""
    P = V0.shape[0]
    Q = torch.zeros(P, m, op.n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(P, m, dtype=torch.float64)
    beta = torch.zeros(P, m, dtype=torch.float64)
    v = V0 / V0.norm(dim=1, keepdim=True)  # (P, n)
    alive = torch.ones(P, dtype=torch.bool, device=op.device)
    for j in range(m):
        Q[:, j] = v
        w = op._rows_products(v)  # (P, n)
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


def slq_density(
    nodes: torch.Tensor,
    weights: torch.Tensor,
    probes: int,
    grid_size: int,
    sigma: float | None,
    dtype: torch.dtype,
) -> Spectrum:
    """Gaussian-smoothed density on a grid spanning the nodes +- 6 sigma, integrating to 1."""
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = sigma if sigma is not None else (0.01 * (hi - lo) or 1e-3)
    grid = torch.linspace(lo - 6 * width, hi + 6 * width, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / width) ** 2)
    density = (kernel * weights.reshape(1, -1)).sum(1) / (probes * width * math.sqrt(2 * math.pi))
    density = density / torch.trapezoid(density, grid)
    return Spectrum(grid.to(dtype), density.to(dtype), nodes.to(dtype), weights.to(dtype))
