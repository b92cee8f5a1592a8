"""R2: the zero-centred squared gradient norm on fake samples (exact or finite-difference)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._zero_centred import ARGS_DOC, FINITE_DIFFERENCE_DOC, zero_centred_penalty

__all__ = ["r2_penalty", "r2_penalty_and_norms"]


def r2_penalty_and_norms(
    critic: TensorFn,
    fake: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    method: str = "exact",
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> PenaltyWithNorms:
    """:func:`r2_penalty` and the per-sample gradient norms (detached, for logging).

    Same arguments and errors as :func:`r2_penalty`. With ``method="finite-difference"`` the
    norms are the per-sample estimates :math:`|D(x_i + \\sigma\\epsilon_i) - D(x_i)|/\\sigma`.

    Example:
        >>> from gradlab.penalties import r2_penalty_and_norms
        >>> penalty, norms = r2_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    penalty, squared_norms = zero_centred_penalty(
        "r2_penalty",
        "fake",
        critic,
        fake,
        gamma=gamma,
        outputs=outputs,
        critic_kwargs=critic_kwargs,
        scaler=scaler,
        method=method,
        sigma=sigma,
        generator=generator,
    )
    return PenaltyWithNorms(penalty, squared_norms.detach().sqrt())


def r2_penalty(
    critic: TensorFn,
    fake: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    method: str = "exact",
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The R2 regularizer: zero-centred squared gradient norm on fake samples.

    .. math::

        R_2 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_{\tilde x} D(\tilde x_i)\|_2^2,

    :func:`r1_penalty` on generated samples (detached from the generator: the penalty is a
    function of the critic only), with the same options, norms, DDP and AMP handling. For the
    per-sample norms call :func:`r2_penalty_and_norms`.
    {fd}
    {args}
    Returns:
        The scalar penalty.

    Raises:
        ValueError: an empty batch, outputs without the batch dimension, negative ``gamma``,
            ``outputs`` given with inputs that do not require grad (exact) or together with
            ``critic_kwargs``, an unknown ``method``, ``sigma``/``generator`` with the exact
            method, ``scaler`` with the finite-difference one.
        GraphError: for the exact method, a ``torch.compile``\ d or FSDP critic (they cannot be
            differentiated twice: use ``method="finite-difference"``); outputs that do not
            depend on ``fake``.

    Example:
        >>> from gradlab.penalties import r2_penalty
        >>> critic = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
        ...                              torch.nn.Linear(8, 1))
        >>> fake = torch.randn(4, 3)
        >>> r2_penalty(critic, fake).shape
        torch.Size([])
        >>> r2_penalty(critic, fake, method="finite-difference", sigma=1e-3).shape
        torch.Size([])

    References:
        Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018.
        Lin et al., "Diffusion Adversarial Post-Training for One-Step Video Generation"
        (Seaweed-APT, approximated R1), arXiv:2501.08316, 2025.
    """
    return zero_centred_penalty(
        "r2_penalty",
        "fake",
        critic,
        fake,
        gamma=gamma,
        outputs=outputs,
        critic_kwargs=critic_kwargs,
        scaler=scaler,
        method=method,
        sigma=sigma,
        generator=generator,
    )[0]


if r2_penalty.__doc__:  # not under python -OO
    r2_penalty.__doc__ = r2_penalty.__doc__.replace("{fd}", FINITE_DIFFERENCE_DOC).replace(
        "{args}", ARGS_DOC.format(arg="fake", what="fake (generated)")
    )
