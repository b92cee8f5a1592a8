"""Test functions shared by the gradlab.testing tests: tanh(A @ x) as custom autograd Functions
with an optional planted error in one Jacobian entry, old-style and new-style."""

from __future__ import annotations

from collections.abc import Callable

import torch


def tanh_affine(
    A: torch.Tensor, *, style: str, wrong: tuple[int, int] | None = None, delta: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> tanh(A @ x)`` whose backward adds ``delta`` to Jacobian entry ``wrong = (i, j)``.

    The wrong vjp is ``J^T g + delta * g[i] * e_j``, i.e. the Jacobian ``J + delta e_i e_j^T``.
    ``style="old"``: ctx in forward (cannot be vmapped); ``"new"``: setup_context + vmap rule.
    """
    n = A.shape[1]
    onehot = torch.zeros(n, dtype=A.dtype, device=A.device)
    i, j = wrong if wrong is not None else (0, 0)
    onehot[j] = 1.0

    def vjp(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gx = (g * (1 - y * y)) @ A
        return gx + delta * g[..., i : i + 1] * onehot if wrong is not None else gx

    if style == "old":

        class Old(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):  # type: ignore[override]
                y = torch.tanh(A @ x)
                ctx.save_for_backward(y)
                return y

            @staticmethod
            def backward(ctx, g):  # type: ignore[override]
                (y,) = ctx.saved_tensors
                return vjp(y, g)

        return Old.apply

    class New(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):  # type: ignore[override]
            return torch.tanh(A @ x)

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            (y,) = ctx.saved_tensors
            return vjp(y, g)

    return New.apply


def problem(n: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
    """A well-scaled ``A`` (entries ~ 1/sqrt(n)) and ``x`` for ``tanh(A @ x)``."""
    gen = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return A.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)
