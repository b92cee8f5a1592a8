"""R1 and R2: zero-centred squared gradient norms on real (R1) or fake (R2) samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._checks import (
    as_tensors,
    check_critic,
    check_critic_kwargs,
    check_nonnegative,
    check_outputs,
    check_requires_grad,
    check_scaler,
)
from gradlab.penalties._critic import (
    PenaltyWithNorms,
    critic_gradients,
    fresh_leaves,
    with_ddp_zero_term,
)
from gradlab.penalties._norms import input_gradients, sample_sq_norms

__all__ = ["r1_penalty", "r1_penalty_and_norms", "r2_penalty", "r2_penalty_and_norms"]


def _r_penalty(
    fn: str,
    arg: str,
    critic: TensorFn,
    x: TensorOrTensors,
    gamma: float,
    outputs: torch.Tensor | None,
    critic_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
) -> PenaltyWithNorms:
    gamma = check_nonnegative(fn, "gamma", gamma)
    xs = as_tensors(fn, arg, x)
    scaler = check_scaler(fn, scaler)
    check_critic(fn, critic)
    if outputs is None:
        kwargs = check_critic_kwargs(fn, critic_kwargs)
        with torch.enable_grad():
            outputs, grads = critic_gradients(fn, critic, fresh_leaves(xs), kwargs, scaler)
    else:
        if critic_kwargs is not None:
            raise ValueError(
                f"{fn}: critic_kwargs has no effect when outputs= is given (the critic is not "
                "called); pass the keyword arguments to the forward pass that made outputs"
            )
        check_requires_grad(fn, arg, xs)
        check_outputs(fn, outputs, xs[0].shape[0], arg="outputs")
        with torch.enable_grad():
            grads = input_gradients(fn, outputs, xs, create_graph=True, scaler=scaler)
    with torch.enable_grad():
        sq_norms = sample_sq_norms(grads)
        penalty = with_ddp_zero_term(sq_norms.mean() * (gamma / 2), outputs, critic)
    return PenaltyWithNorms(penalty, sq_norms.detach().sqrt())


_ARGS_DOC = r"""
    Args:
        critic: the critic, called as ``critic(*x, **critic_kwargs)`` (unless ``outputs`` is
            given); scores of shape ``(B,)`` or ``(B, ...)`` (several per sample are summed).
        {arg}: {what} samples ``(B, ...)``, or a tuple of tensors for a critic with several inputs.
        gamma: :math:`\gamma \ge 0`.
        outputs: the critic's outputs on ``{arg}`` from a forward pass you already made (e.g. the
            one of the adversarial loss, as StyleGAN2 does), to avoid a second forward. Then
            ``{arg}`` must be the very tensors that produced ``outputs`` and must require grad
            (``x = x.detach().requires_grad_(True); outputs = critic(x)``), and the critic is not
            called. Without it the critic is called on fresh leaf copies of ``{arg}``.
        critic_kwargs: extra keyword arguments for the critic (e.g. ``{{"labels": y}}``); not
            allowed with ``outputs``.
        scaler: a :class:`torch.amp.GradScaler` for mixed precision (see
            :func:`input_gradient_norms`).
"""


def r1_penalty_and_norms(
    critic: TensorFn,
    real: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> PenaltyWithNorms:
    """:func:`r1_penalty` and the per-sample gradient norms (detached, for logging).

    Example:
        >>> from gradlab.penalties import r1_penalty_and_norms
        >>> penalty, norms = r1_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    return _r_penalty("r1_penalty", "real", critic, real, gamma, outputs, critic_kwargs, scaler)


def r1_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    r"""The R1 regularizer: zero-centred squared gradient norm on real samples.

    .. math::

        R_1 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_x D(x_i)\|_2^2,

    the squared norm running over every non-batch dimension of every input (a plain sum of
    squares, smooth everywhere). No ``.grad`` is touched; works under ``torch.no_grad()``; safe
    for a penalty-only (lazy) backward under DistributedDataParallel. For the per-sample norms
    call :func:`r1_penalty_and_norms`.
    {args}
    Returns:
        The scalar penalty.

    Raises:
        ValueError: outputs without the batch dimension, negative ``gamma``, ``outputs`` given
            with inputs that do not require grad or together with ``critic_kwargs``.
        GraphError: a ``torch.compile``\ d critic, or outputs that do not depend on ``real``.

    Example:
        >>> from gradlab.penalties import r1_penalty
        >>> critic = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> r1_penalty(critic, torch.randn(6, 2), gamma=2.0)  # gamma/2 * ||w||^2 = 25
        tensor(25., grad_fn=<MulBackward0>)

    References:
        Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018.
    """
    return r1_penalty_and_norms(
        critic, real, gamma=gamma, outputs=outputs, critic_kwargs=critic_kwargs, scaler=scaler
    ).penalty


def r2_penalty_and_norms(
    critic: TensorFn,
    fake: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> PenaltyWithNorms:
    """:func:`r2_penalty` and the per-sample gradient norms (detached, for logging).

    Example:
        >>> from gradlab.penalties import r2_penalty_and_norms
        >>> penalty, norms = r2_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    return _r_penalty("r2_penalty", "fake", critic, fake, gamma, outputs, critic_kwargs, scaler)


def r2_penalty(
    critic: TensorFn,
    fake: TensorOrTensors,
    *,
    gamma: float = 10.0,
    outputs: torch.Tensor | None = None,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    r"""The R2 regularizer: zero-centred squared gradient norm on fake samples.

    .. math::

        R_2 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_{\tilde x} D(\tilde x_i)\|_2^2.

    Identical to :func:`r1_penalty` but meant for generated samples (detached from the
    generator: the penalty is a function of the critic only). For the norms call
    :func:`r2_penalty_and_norms`.
    {args}
    Returns:
        The scalar penalty.

    Raises:
        ValueError: as :func:`r1_penalty`.
        GraphError: as :func:`r1_penalty`.

    Example:
        >>> from gradlab.penalties import r2_penalty
        >>> critic = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
        ...                              torch.nn.Linear(8, 1))
        >>> r2_penalty(critic, torch.randn(4, 3)).shape
        torch.Size([])

    References:
        Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018.
    """
    return r2_penalty_and_norms(
        critic, fake, gamma=gamma, outputs=outputs, critic_kwargs=critic_kwargs, scaler=scaler
    ).penalty


if r1_penalty.__doc__ and r2_penalty.__doc__:  # not under python -OO
    r1_penalty.__doc__ = r1_penalty.__doc__.replace(
        "{args}", _ARGS_DOC.format(arg="real", what="real")
    )
    r2_penalty.__doc__ = r2_penalty.__doc__.replace(
        "{args}", _ARGS_DOC.format(arg="fake", what="fake (generated)")
    )
