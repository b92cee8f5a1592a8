"""Shared machinery of the penalties: call the critic on fresh leaves, take input gradients, and
make a penalty-only backward safe under DistributedDataParallel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from gradlab._typing import TensorFn
from gradlab.penalties._checks import check_outputs, is_ddp
from gradlab.penalties._norms import input_gradients

__all__ = ["PenaltyWithNorms", "critic_gradients", "fresh_leaves", "with_ddp_zero_term"]


class PenaltyWithNorms(NamedTuple):
    """What the ``*_and_norms`` penalty functions return.

    Attributes:
        penalty: the scalar penalty to add to the loss (differentiable w.r.t. the critic).
        norms: the per-sample input-gradient norms the penalty was computed from, shape ``(B,)``,
            detached: log them (mean, max, fraction near the target) at no extra cost.
    """

    penalty: torch.Tensor
    norms: torch.Tensor


def fresh_leaves(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """New leaf tensors sharing the data of ``xs``, with ``requires_grad=True`` (no copy)."""
    return tuple(x.detach().requires_grad_(True) for x in xs)


def critic_gradients(
    fn: str,
    critic: TensorFn,
    leaves: tuple[torch.Tensor, ...],
    critic_kwargs: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(outputs, grads)``: the critic's outputs at ``leaves`` and their input gradients."""
    outputs = critic(*leaves, **critic_kwargs)
    check_outputs(fn, outputs, leaves[0].shape[0])
    return outputs, input_gradients(fn, outputs, leaves, create_graph=True, scaler=scaler)


class _ZeroGradToOutputs(torch.autograd.Function):
    """Identity on ``penalty`` whose backward also sends a zero gradient into ``outputs``.

    Equivalent to StyleGAN2-ADA's ``penalty + 0 * outputs`` but exact: the forward value stays the
    penalty even where an output is inf or NaN (``0 * inf`` would be NaN).
    """

    @staticmethod
    def forward(ctx: Any, penalty: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        ctx.spec = (outputs.shape, outputs.dtype, outputs.device)
        return penalty.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.spec
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def with_ddp_zero_term(penalty: torch.Tensor, outputs: torch.Tensor, critic: Any) -> torch.Tensor:
    """Make every parameter of a DDP critic take part in a penalty-only backward.

    The penalty's gradient does not reach every parameter (the last layer's bias never affects an
    input gradient), so DDP waits forever for those parameters' gradients and the next iteration
    fails with "Expected to have finished reduction in the prior iteration". A zero gradient into
    the critic's outputs reaches every parameter the forward used, as StyleGAN2-ADA does.
    """
    if is_ddp(critic):
        return _ZeroGradToOutputs.apply(penalty, outputs)
    return penalty
