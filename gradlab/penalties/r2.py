r"""R2: the zero-centred squared gradient norm on fake samples (exact or finite-difference)."""

from __future__ import annotations

from typing import Any

import torch

from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._registry import bind, twin_of
from gradlab.penalties._zero_centred import register_zero_centred, with_norms, zero_centred_penalty
from gradlab.penalties.r1 import r1_penalty

__all__ = ["r2_penalty", "r2_penalty_and_norms"]

_R2 = ("r2_penalty", "fake")  # the function and sample argument that messages name


@twin_of(r1_penalty, rename={"real": "fake"})
def r2_penalty(*args: Any, **kwargs: Any) -> torch.Tensor:
    r"""The R2 regularizer: zero-centred squared gradient norm on fake samples.

    .. math::

        R_2 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_{\tilde x} D(\tilde x_i)\|_2^2,

    that is :func:`r1_penalty` on generated samples :math:`\tilde x` (detached from the
    generator: the penalty is a function of the critic only), computed by the same code: the
    same norms, options, DDP and AMP handling, and the same finite-difference estimator
    (``method="finite-difference"``:
    :math:`\frac{\gamma}{2}\frac1B\sum_i (D(\tilde x_i + \sigma\epsilon_i) - D(\tilde x_i))^2
    / \sigma^2`, whose bias and variance :func:`r1_penalty` states). For the per-sample norms
    call :func:`r2_penalty_and_norms`.

    Args:
        critic: the critic, called as ``critic(*fake, **critic_kwargs)``.
        fake: generated samples ``(B, ...)``, or a tuple of tensors (several critic inputs).
        gamma: :math:`\gamma \ge 0`, as for :func:`r1_penalty`.
        outputs: the critic's outputs on ``fake`` from a forward pass you already made (the
            rules of :func:`r1_penalty`'s ``outputs`` apply).
        critic_kwargs: extra keyword arguments for the critic (e.g. ``{"labels": y}``).
        scaler: a :class:`torch.amp.GradScaler` (exact method only).
        method: ``"exact"`` or ``"finite-difference"``.
        sigma: the finite-difference step (default 0.01); finite-difference only.
        generator: a :class:`torch.Generator` or an int seed; finite-difference only.

    Returns:
        The scalar penalty.

    Raises:
        ValueError, TypeError, GraphError: as :func:`r1_penalty`, naming ``r2_penalty`` and
            ``fake``.

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
    """
    return zero_centred_penalty(_R2, *bind("r2_penalty", r2_penalty, args, kwargs))[0]


@twin_of(r2_penalty)
def r2_penalty_and_norms(*args: Any, **kwargs: Any) -> PenaltyWithNorms:
    r""":func:`r2_penalty` and the per-sample gradient norms (detached, for logging).

    Same arguments and errors as :func:`r2_penalty`; ``norms`` are
    :math:`\|\nabla D(\tilde x_i)\|_2` (estimates with finite differences). A twin rather than a
    flag: see :class:`PenaltyWithNorms`.

    Example:
        >>> from gradlab.penalties import r2_penalty_and_norms
        >>> out = r2_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> out.penalty.shape, out.norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    return with_norms(
        *zero_centred_penalty(_R2, *bind("r2_penalty_and_norms", r2_penalty, args, kwargs))
    )


register_zero_centred("r2", r2_penalty, r2_penalty_and_norms, "fake")
