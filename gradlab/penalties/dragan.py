"""DRAGAN: the gradient penalty around perturbed real samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._interpolate import Perturbation, perturb
from gradlab.penalties._registry import PenaltyEntry, bind, register_penalty, twin_of
from gradlab.penalties.wgan_gp import interpolates_penalty

__all__ = ["dragan_penalty", "dragan_penalty_and_norms", "perturb"]

_FN = "dragan_penalty"


def _dragan_penalty(args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` (norms not detached) from :func:`dragan_penalty`'s arguments, in its
    order: WGAN-GP's core with the real samples' :class:`Perturbation` as the far end."""
    critic, real, weight, center, noise_scale, critic_kwargs, scaler, generator = args
    far = Perturbation(noise_scale)
    return interpolates_penalty(
        _FN, critic, real, far, weight, center, False, critic_kwargs, scaler, generator
    )


def dragan_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    *,
    weight: float = 10.0,
    center: float = 1.0,
    noise_scale: float = 0.5,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    r"""The DRAGAN gradient penalty: WGAN-GP's penalty in a noisy neighbourhood of the real data.

    .. math::

        x^p = x + s\,\sigma(x)\,u,\quad u \sim U[0,1)^{\text{shape}(x)},\qquad
        \hat x_i = x_i + a_i (x^p_i - x_i),\quad a_i \sim U[0, 1),

    .. math::

        \mathrm{DRAGAN} = \lambda\,\frac1B\sum_i \big(\|\nabla_{\hat x} D(\hat x_i)\|_2 - c\big)^2,

    with :math:`s` = ``noise_scale``, :math:`\sigma(x)` the standard deviation of ``real`` over
    the whole batch (as in the authors' code; per tensor for tuple inputs), the noise :math:`u`
    drawn per element and :math:`a_i` once per sample. The perturbation is drawn first, then the
    coefficients, both from ``generator``. The norm, leaf copies, DDP and AMP handling are those of
    :func:`gradient_penalty`; :func:`dragan_penalty_and_norms` also returns the norms.

    Args:
        critic: the critic, called as ``critic(*x_hat, **critic_kwargs)``.
        real: real samples ``(B, ...)``, or a tuple of tensors for a critic with several inputs.
        weight: :math:`\lambda \ge 0`.
        center: :math:`c \ge 0`.
        noise_scale: :math:`s \ge 0` (0.5 in the paper's code).
        critic_kwargs: extra keyword arguments for the critic.
        scaler: a :class:`torch.amp.GradScaler` for mixed precision.
        generator: a :class:`torch.Generator` or an int seed for the noise and the
            coefficients.

    Returns:
        The scalar penalty.

    Raises:
        ValueError: an empty batch; negative ``weight``, ``center`` or ``noise_scale``; a critic
            output without the batch dimension.
        GraphError: a ``torch.compile``\ d or FSDP critic (they cannot be differentiated twice).

    Example:
        >>> from gradlab.penalties import dragan_penalty
        >>> critic = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[0.6, 0.8]]))
        >>> dragan_penalty(critic, torch.randn(5, 2))  # ||w|| = 1 everywhere: no penalty
        tensor(0., grad_fn=<MulBackward0>)

    References:
        Kodali et al., "On Convergence and Stability of GANs", arXiv:1705.07215, 2017.
    """
    args = (critic, real, weight, center, noise_scale, critic_kwargs, scaler, generator)
    return _dragan_penalty(args)[0]


@twin_of(dragan_penalty)
def dragan_penalty_and_norms(*args: Any, **kwargs: Any) -> PenaltyWithNorms:
    """:func:`dragan_penalty` and the per-sample gradient norms (detached, for logging).

    Same arguments and errors as :func:`dragan_penalty`. A twin rather than a flag: see
    :class:`PenaltyWithNorms`.

    Example:
        >>> from gradlab.penalties import dragan_penalty_and_norms
        >>> penalty, norms = dragan_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    penalty, norms = _dragan_penalty(bind("dragan_penalty_and_norms", dragan_penalty, args, kwargs))
    return PenaltyWithNorms(penalty, norms.detach())


register_penalty(
    PenaltyEntry(
        "dragan",
        dragan_penalty,
        inputs=("real",),
        zero_centred=False,
        with_norms=dragan_penalty_and_norms,
        random=True,
    )
)
