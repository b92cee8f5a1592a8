r"""R1: the zero-centred squared gradient norm on real samples (exact or finite-difference)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._registry import bind, twin_of
from gradlab.penalties._zero_centred import register_zero_centred, with_norms, zero_centred_penalty

__all__ = ["r1_penalty", "r1_penalty_and_norms"]

_R1 = ("r1_penalty", "real")  # the function and sample argument that messages name
_R1_NORMS = "r1_penalty_and_norms"


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
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    r"""The R1 regularizer: zero-centred squared gradient norm on real samples.

    .. math::

        R_1 = \frac{\gamma}{2}\,\frac1B \sum_{i=1}^{B} \|\nabla_x D(x_i)\|_2^2,

    the squared norm running over every non-batch dimension of every input (a plain sum of
    squares, smooth everywhere). No ``.grad`` is touched; works under ``torch.no_grad()``; safe
    for a penalty-only (lazy) backward under DistributedDataParallel. For the per-sample norms
    call :func:`r1_penalty_and_norms`.

    **Finite differences** (``method="finite-difference"``) replace the double backward by

    .. math::

        \frac{\gamma}{2}\,\frac1B\sum_{i=1}^{B}
            \frac{\big(D(x_i + \sigma\epsilon_i) - D(x_i)\big)^2}{\sigma^2},\qquad
        \epsilon_i \sim \mathcal N(0, I),

    (approximated R1, Seaweed-APT) which needs one extra forward (none more with ``outputs=``)
    and a first-order backward, so it runs through FSDP and ``torch.compile``. Its expectation
    is the exact penalty plus a bias of order :math:`\sigma^2` (curvature terms: exactly 0 for a
    linear critic, :math:`\frac{\sigma^2}{4}((\operatorname{tr}A)^2 + 2\|A\|_F^2)` per sample
    for a quadratic one with Hessian :math:`A`); each sample's estimate is to leading order
    :math:`\|\nabla D\|^2\chi^2_1`, so the batch mean has relative standard deviation
    :math:`\sqrt{2/B}`. Choose :math:`\sigma` small against the scale on which the critic's
    gradient changes (0.01 for data in [-1, 1]) but large enough that the difference stands out
    of the rounding of :math:`D`: the relative error of one estimate is about
    :math:`2u|D|/(\sigma\|\nabla D\|)` with unit roundoff :math:`u` (:math:`6\cdot10^{-8}` in
    float32, :math:`5\cdot10^{-4}` in float16, :math:`4\cdot10^{-3}` in bfloat16), so under
    reduced-precision autocast use a larger :math:`\sigma`. The difference itself is taken in
    at least float32. The derivation is in ``gradlab/penalties/_finite_difference.py``.

    Args:
        critic: the critic, called as ``critic(*real, **critic_kwargs)``; scores of shape
            ``(B,)`` or ``(B, ...)`` (several per sample are summed).
        real: real samples ``(B, ...)``, or a tuple of tensors for a critic with several inputs.
        gamma: :math:`\gamma \ge 0`. StyleGAN2/StyleGAN2-ADA's ``r1_gamma`` is this
            :math:`\gamma` (their loss is ``r1_penalty * (r1_gamma / 2)``); GAN_stability's
            ``reg_param`` multiplies the squared norm without the 1/2, so ``reg_param = r`` is
            ``gamma = 2 * r`` here.
        outputs: the critic's outputs on ``real`` from a forward pass you already made (the one
            of the adversarial loss, as StyleGAN2 does), to avoid a second forward. ``real``
            must be the very tensors that produced ``outputs`` and, for the exact method, must
            require grad (``x = x.detach().requires_grad_(True); outputs = critic(x)``); the
            critic is then not called (exact) or called only on the perturbed samples (finite
            difference). Without it the critic is called on fresh leaf copies of ``real``.
        critic_kwargs: extra keyword arguments for the critic (e.g. ``{"labels": y}``). With
            ``outputs`` and the exact method it is refused (the critic is not called); with
            ``outputs`` and finite differences pass the ones ``outputs`` was computed with: the
            first call per critic checks that ``critic(real, **critic_kwargs)`` reproduces
            ``outputs`` (one extra forward) and raises if it does not.
        scaler: a :class:`torch.amp.GradScaler` for mixed precision (exact method only; see
            :func:`input_gradient_norms`).
        method: ``"exact"`` (one double backward) or ``"finite-difference"`` (no double
            backward).
        sigma: the finite-difference step :math:`\sigma > 0` (default 0.01); finite-difference
            only.
        generator: a :class:`torch.Generator` or an int seed for :math:`\epsilon` (one
            :func:`torch.randn` per input, in order); finite-difference only.

    Returns:
        The scalar penalty.

    Raises:
        ValueError: an empty batch, outputs without the batch dimension, negative ``gamma``,
            ``outputs`` given with inputs that do not require grad or together with
            ``critic_kwargs`` (exact method), ``outputs`` the critic does not reproduce (finite
            differences), an unknown ``method``, ``sigma``/``generator`` with the exact method,
            ``scaler`` with the finite-difference one.
        TypeError: a critic that is not callable, non-tensor or integer samples, an option of
            the wrong type.
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
        >>> fd = r1_penalty(critic, x, gamma=2.0, method="finite-difference", generator=0)
        >>> abs(fd.item() - 25.0) < 4 * 25.0 * (2 / 20000) ** 0.5
        True

    References:
        Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018.
        Lin et al., "Diffusion Adversarial Post-Training for One-Step Video Generation"
        (Seaweed-APT, approximated R1), arXiv:2501.08316, 2025.
    """
    return zero_centred_penalty(
        _R1, critic, real, gamma, outputs, critic_kwargs, scaler, method, sigma, generator
    )[0]


@twin_of(r1_penalty)
def r1_penalty_and_norms(*args: Any, **kwargs: Any) -> PenaltyWithNorms:
    r""":func:`r1_penalty` and the per-sample gradient norms (detached, for logging).

    Same arguments and errors as :func:`r1_penalty`; returns :class:`PenaltyWithNorms`
    ``(penalty, norms)`` with ``norms`` :math:`\|\nabla_x D(x_i)\|_2`, shape ``(B,)``, at no
    extra cost (with ``method="finite-difference"``: the per-sample estimates
    :math:`|D(x_i + \sigma\epsilon_i) - D(x_i)|/\sigma`).

    A twin rather than ``return_norms=True``: one return structure per call signature (see
    :class:`PenaltyWithNorms`).

    Example:
        >>> from gradlab.penalties import r1_penalty_and_norms
        >>> penalty, norms = r1_penalty_and_norms(torch.nn.Linear(3, 1), torch.randn(4, 3))
        >>> penalty.shape, norms.shape
        (torch.Size([]), torch.Size([4]))
    """
    return with_norms(*zero_centred_penalty(_R1, *bind(_R1_NORMS, r1_penalty, args, kwargs)))


register_zero_centred("r1", r1_penalty, r1_penalty_and_norms, "real")
