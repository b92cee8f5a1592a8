"""The result types of the eigenvalue and spectrum estimators."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Eigenpairs", "Spectrum"]


class Eigenpairs(NamedTuple):
    """Top-k eigenpairs by magnitude, largest first.

    ``values``: shape ``(k,)``. ``vectors``: shape ``(k, n)``, row ``i`` the unit eigenvector of
    ``values[i]`` flattened over ``params`` in order (``torch.cat([p.flatten() ...])``).
    Returned by :func:`gradlab.hessian_eigenvalues` and :func:`gradlab.curvature.eigenvalues`;
    a tuple, so ``values, vectors = pairs`` unpacks it.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> pairs = gl.hessian_eigenvalues(lambda: (w**4).sum(), w, k=2)  # H = diag(12 w^2)
        >>> values, vectors = pairs
        >>> values.round(), tuple(vectors.shape)
        (tensor([48., 12.]), (2, 3))
        >>> vectors.abs().round()  # unit vectors along w[1], then w[0]
        tensor([[0., 1., 0.],
                [1., 0., 0.]])
    """

    values: torch.Tensor
    vectors: torch.Tensor

    def __repr__(self) -> str:
        """The values (k numbers) and the vectors' shape, never the whole vectors."""
        vals = ", ".join(f"{float(v):.6g}" for v in self.values.flatten()[:8])
        more = ", ..." if self.values.numel() > 8 else ""
        return f"Eigenpairs(values=[{vals}{more}], vectors: {tuple(self.vectors.shape)})"


class Spectrum(NamedTuple):
    """Spectral density estimate by stochastic Lanczos quadrature.

    ``grid`` and ``density`` (same length; ``torch.trapezoid(density, grid) == 1``), and the
    quadrature the density is smoothed from: ``nodes`` (Ritz values) and ``weights`` of shape
    ``(probes, steps)``, each probe's weights summing to 1. Returned by
    :func:`gradlab.hessian_spectrum` and :func:`gradlab.curvature.spectrum`.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> s = gl.hessian_spectrum(lambda: (w**4).sum(), w, probes=4, generator=0)
        >>> s.grid.shape == s.density.shape, round(torch.trapezoid(s.density, s.grid).item(), 4)
        (True, 1.0)
        >>> tuple(s.nodes.shape), s.weights.sum(dim=1).round(decimals=4)  # each probe sums to 1
        ((4, 3), tensor([1., 1., 1., 1.]))
        >>> s.nodes[0].round()  # the Ritz values: here the eigenvalues 12 w^2 themselves
        tensor([ 3., 12., 48.])
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
