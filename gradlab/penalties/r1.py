"""R1: the zero-centred squared gradient norm on real samples (exact or finite-difference)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._zero_centred import ARGS_DOC, FINITE_DIFFERENCE_DOC, zero_centred_penalty

__all__ = ["r1_penalty", "r1_penalty_and_norms"]


def r1_penalty_and_norms(
    critic: TensorFn,
    real: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    method: str = "exact",
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> PenaltyWithNorms:
    """:func:`r1_penalty` and the per-sample gradient norms (detached, for logging).

    Same arguments and errors as :func:`r1_penalty`. With ``method="finite-difference"`` the
    norms are the per-sample estimates :math:`|D(x_i + \\sigma\\epsilon_i) - D(x_i)|/\\sigma`.

    Example:
        >>> from gradlab.penalties import r1_penalty_and_norms
        >>> penalty, norms = r1_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    penalty, squared_norms = zero_centred_penalty(
        "r1_penalty",
        "real",
        critic,
        real,
        gamma=gamma,
        outputs=outputs,
        critic_kwargs=critic_kwargs,
        scaler=scaler,
        method=method,
        sigma=sigma,
        generator=generator,
    )
    return PenaltyWithNorms(penalty, squared_norms.detach().sqrt())


def r1_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    method: str = "exact",
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The R1 regularizer: zero-centred squared gradient norm on real samples.

    .. math::

        R_1 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_x D(x_i)\|_2^2,

    the squared norm running over every non-batch dimension of every input (a plain sum of
    squares, smooth everywhere). No ``.grad`` is touched; works under ``torch.no_grad()``; safe
    for a penalty-only (lazy) backward under DistributedDataParallel. For the per-sample norms
    call :func:`r1_penalty_and_norms`.
    {fd}
    {args}
    Returns:
        The scalar penalty.

    Raises:
        ValueError: an empty batch, outputs without the batch dimension, negative ``gamma``,
            ``outputs`` given with inputs that do not require grad or together with
            ``critic_kwargs`` (exact method), an unknown ``method``, ``sigma``/``generator``
            with the exact method, ``scaler`` with the finite-difference one.
        GraphError: for the exact method, a ``torch.compile``\ d or FSDP critic (they cannot be
            differentiated twice: use ``method="finite-difference"``); outputs that do not
            depend on ``real``.

    Example:
        >>> from gradlab.penalties import r1_penalty
        >>> critic = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> r1_penalty(critic, torch.randn(6, 2), gamma=2.0)  # gamma/2 * ||w||^2 = 25
        tensor(25., grad_fn=<MulBackward0>)
        >>> x = torch.randn(20000, 2)  # an unbiased estimate for a linear critic, sd 25*sqrt(2/B)
        >>> fd = r1_penalty(critic, x, gamma=2.0, method="finite-difference",
        ...                 generator=torch.Generator().manual_seed(0))
        >>> abs(fd.item() - 25.0) < 4 * 25.0 * (2 / 20000) ** 0.5
        True

    References:
        Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018.
        Lin et al., "Diffusion Adversarial Post-Training for One-Step Video Generation"
        (Seaweed-APT, approximated R1), arXiv:2501.08316, 2025.
    """
    return zero_centred_penalty(
        "r1_penalty",
        "real",
        critic,
        real,
        gamma=gamma,
        outputs=outputs,
        critic_kwargs=critic_kwargs,
        scaler=scaler,
        method=method,
        sigma=sigma,
        generator=generator,
    )[0]


if r1_penalty.__doc__:  # not under python -OO
    r1_penalty.__doc__ = r1_penalty.__doc__.replace("{fd}", FINITE_DIFFERENCE_DOC).replace(
        "{args}", ARGS_DOC.format(arg="real", what="real")
    )
