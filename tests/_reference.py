"""Independent float64 references for the derivative tests (no gradlab code involved)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fd_jacobian(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Central differences in float64: ``J[..., j] = (f(x + eps e_j) - f(x - eps e_j)) / 2eps``."""
    x = x.detach().to(torch.float64)
    flat = x.reshape(-1)
    cols = []
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = eps
        plus = f((flat + e).reshape(x.shape)).to(torch.float64)
        minus = f((flat - e).reshape(x.shape)).to(torch.float64)
        cols.append((plus - minus) / (2 * eps))
    out_shape = cols[0].shape
    return torch.stack(cols, dim=-1).reshape(tuple(out_shape) + tuple(x.shape))


def fd_hessian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Central differences of the analytic-free gradient: nested central differences in float64."""

    def grad_fd(z: torch.Tensor) -> torch.Tensor:
        return fd_jacobian(f, z, eps=1e-4)

    return fd_jacobian(grad_fd, x, eps=1e-4)
