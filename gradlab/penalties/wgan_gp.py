"""WGAN-GP, WGAN-LP (one-sided) and the zero-centred gradient penalty on random interpolates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab._validate import check_generator, check_nonnegative
from gradlab.penalties._checks import (
    as_tensors,
    check_critic,
    check_critic_kwargs,
    check_nonempty,
    check_pair,
    check_scaler,
)
from gradlab.penalties._core import PenaltyWithNorms, exact_penalty, make_spec
from gradlab.penalties._interpolate import Perturbation, interpolate_leaves, perturb
from gradlab.penalties._registry import PenaltyEntry, bind, register_penalty, twin_of

__all__ = ["gradient_penalty", "gradient_penalty_and_norms", "interpolates_penalty"]

_FN = "gradient_penalty"


def interpolates_penalty(
    fn: str,
    critic: TensorFn,
    real: TensorOrTensors,
    fake: TensorOrTensors | Perturbation,
    weight: float,
    center: float,
    one_sided: bool,
    critic_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` (norms not detached) of the penalties on random interpolates:
    validate, interpolate, hand over to the core (``_core.py``).

    :func:`gradient_penalty` (``fn="gradient_penalty"``) passes its arguments in order;
    :func:`~gradlab.penalties.dragan_penalty` passes, for ``fake``, a
    :class:`~gradlab.penalties._interpolate.Perturbation` (the real samples perturbed, drawn
    from ``generator`` before the coefficients) and ``one_sided=False``. The arguments are
    checked in the order of the public signature (``noise_scale`` where DRAGAN has it, after
    ``center``), and each check accepts the common case (float options, one tensor per sample,
    no scaler) with a type test or two, so this is as cheap as a hand-written step up to a few
    Python calls.
    """
    spec = make_spec(
        fn,
        check_nonnegative(fn, "weight", weight),
        check_nonnegative(fn, "center", center),
        bool(one_sided),
    )
    f: tuple[torch.Tensor, ...] = ()
    if isinstance(fake, Perturbation):  # DRAGAN: the far end is the real samples, perturbed
        noise_scale = check_nonnegative(fn, "noise_scale", fake.noise_scale)
        r = as_tensors(fn, "real", real)
    else:
        r, f = check_pair(fn, real, fake)
    check_nonempty(fn, "real", r)
    kwargs = check_critic_kwargs(fn, critic_kwargs)
    scaler = check_scaler(fn, scaler)
    generator = check_generator(fn, "generator", generator)
    check_critic(fn, critic)
    if isinstance(fake, Perturbation):
        with torch.no_grad():
            r = tuple(x.detach() for x in r)
            leaves = interpolate_leaves(r, perturb(r, noise_scale, generator), generator)
    else:
        leaves = interpolate_leaves(r, f, generator)
    return exact_penalty(spec, critic, leaves, kwargs, scaler)


def gradient_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    fake: TensorOrTensors,
    *,
    weight: float = 10.0,
    center: float = 1.0,
    one_sided: bool = False,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    r"""The WGAN-GP gradient penalty (``one_sided=True``: WGAN-LP; ``center=0``: zero-centred GP).

    .. math::

        \mathrm{GP} = \lambda\,\frac1B \sum_{i=1}^{B}
            \big(\|\nabla_{\hat x} D(\hat x_i)\|_2 - c\big)^2, \qquad
        \hat x_i = x_i + a_i(\tilde x_i - x_i),\ a_i \sim U[0, 1),

    with :math:`\lambda` = ``weight``, :math:`c` = ``center``, real :math:`x` and fake
    :math:`\tilde x`. One-sided (WGAN-LP, Petzka et al. 2018) replaces the square by
    :math:`\max(0, \|\cdot\|_2 - c)^2`; ``center=0`` is the zero-centred GP (Thanh-Tung et al.
    2019). The coefficient :math:`a_i` is drawn once per sample and shared by all of a sample's
    inputs (see :func:`interpolate`); the norm runs over every non-batch dimension of every input
    and is zero-safe (see :func:`input_gradient_norms`).

    Here :math:`a_i` weights the *fake* sample (``torch.lerp(real, fake, a)``). StudioGAN and the
    WGAN-GP authors' toy code (``gan_toy.py``) write ``alpha * real + (1 - alpha) * fake``,
    where the draw weights the *real* one: with :math:`a \sim U[0,1)` both give the same
    distribution of :math:`\hat x` (the penalty's expectation is the same), but the same seed
    gives different points; to reproduce such code draw for draw, pass ``real`` and ``fake``
    swapped.

    The critic is evaluated on fresh leaf tensors (``real``/``fake`` are detached: the penalty is
    a function of the critic's parameters only) and differentiated with
    :func:`torch.autograd.grad`, so neither the caller's tensors nor any parameter's ``.grad`` is
    touched, and no ``backward(create_graph=True)`` reference cycle is made. Works under
    ``torch.no_grad()`` (gradients are enabled inside). For per-sample norms to log, call
    :func:`gradient_penalty_and_norms`.

    Under DistributedDataParallel a zero gradient is sent into the critic's outputs so that a
    penalty-only backward reaches every parameter (as StyleGAN2-ADA does); ``static_graph=True``
    is refused. FSDP (1 and 2) critics are refused: FSDP does not support double backward (wrap
    the critic with DDP, or use ``r1_penalty(..., method="finite-difference")``). Under AMP pass
    ``scaler=`` and call inside the ``torch.autocast`` region; then backpropagate
    ``scaler.scale(loss)`` as usual (see :func:`input_gradient_norms`, which also says why the
    first steps with a default ``GradScaler`` under float16 are skipped).

    Args:
        critic: the critic, called as ``critic(*x_hat, **critic_kwargs)``; it returns scores of
            shape ``(B,)`` or ``(B, ...)`` (several scores per sample are summed).
        real: real samples ``(B, ...)``, or a tuple of tensors for a critic with several inputs.
        fake: fake samples with the same structure, shapes, dtypes and devices as ``real``.
        weight: :math:`\lambda \ge 0` (10 in the WGAN-GP paper).
        center: :math:`c \ge 0`, the target norm (1 for WGAN-GP, 0 for the zero-centred GP).
        one_sided: penalise only norms above ``center`` (WGAN-LP).
        critic_kwargs: extra keyword arguments for the critic (e.g. ``{"labels": y}``).
        scaler: a :class:`torch.amp.GradScaler` for mixed precision.
        generator: a :class:`torch.Generator` or an int seed for the interpolation
            coefficients.

    Returns:
        The scalar penalty, to add to the critic's loss.

    Raises:
        ValueError: an empty batch, mismatched ``real``/``fake`` shapes, a critic output without
            the batch dimension, a negative weight or center, a ``static_graph=True`` DDP critic.
        TypeError: non-tensor or non-floating inputs, a ``scaler`` that is not a GradScaler.
        GraphError: a critic compiled with ``torch.compile`` or wrapped with FSDP (they cannot be
            differentiated twice), or a critic whose output does not depend on an input.

    Example:
        >>> from gradlab.penalties import gradient_penalty
        >>> critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
        ...                              torch.nn.Linear(4 * 6 * 6, 1))
        >>> real, fake = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
        >>> gp = gradient_penalty(critic, real, fake)
        >>> gp.shape, bool(gp > 0)
        (torch.Size([]), True)

    References:
        Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017.
        Petzka et al., "On the regularization of Wasserstein GANs", ICLR 2018.
    """
    return interpolates_penalty(
        _FN, critic, real, fake, weight, center, one_sided, critic_kwargs, scaler, generator
    )[0]


@twin_of(gradient_penalty)
def gradient_penalty_and_norms(*args: Any, **kwargs: Any) -> PenaltyWithNorms:
    """:func:`gradient_penalty` and the per-sample gradient norms it was computed from.

    Same arguments and errors as :func:`gradient_penalty`; returns a :class:`PenaltyWithNorms`
    ``(penalty, norms)`` whose ``norms`` (shape ``(B,)``, detached) are for logging, at no extra
    cost. A twin rather than a flag: see :class:`PenaltyWithNorms`.

    Example:
        >>> from gradlab.penalties import gradient_penalty_and_norms
        >>> critic = torch.nn.Linear(4, 1)
        >>> out = gradient_penalty_and_norms(critic, torch.randn(8, 4), torch.randn(8, 4))
        >>> out.penalty.shape, out.norms.shape
        (torch.Size([]), torch.Size([8]))
    """
    args = bind("gradient_penalty_and_norms", gradient_penalty, args, kwargs)
    penalty, norms = interpolates_penalty(_FN, *args)
    return PenaltyWithNorms(penalty, norms.detach())


register_penalty(
    PenaltyEntry(
        "wgan-gp",
        gradient_penalty,
        inputs=("real", "fake"),
        zero_centred=False,
        with_norms=gradient_penalty_and_norms,
        random=True,
    )
)
