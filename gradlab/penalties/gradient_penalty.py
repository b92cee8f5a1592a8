"""WGAN-GP, WGAN-LP (one-sided) and the zero-centred gradient penalty."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._checks import (
    check_critic,
    check_critic_kwargs,
    check_nonnegative,
    check_outputs,
    check_pair,
    check_scaler,
    is_ddp,
)
from gradlab.penalties._critic import PenaltyWithNorms, critic_gradients, with_ddp_zero_term
from gradlab.penalties._interpolate import (
    detached_interpolate_leaves,
    per_sample_uniform,
    uniform_like,
)
from gradlab.penalties._norms import grad_error, sample_norms

__all__ = ["gradient_penalty", "gradient_penalty_and_norms", "norm_penalty"]

_INF = math.inf
_DOT_DTYPES = (torch.float32, torch.float64)
_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})
# Shapes and dims precomputed for the fast path (inputs of up to 8 dimensions).
_MAX_FAST_NDIM = 8
_TRAILING_ONES = tuple((1,) * k for k in range(_MAX_FAST_NDIM))
_SAMPLE_DIMS = tuple(tuple(range(1, n)) for n in range(_MAX_FAST_NDIM + 1))


def norm_penalty(
    norms: torch.Tensor, *, weight: float, center: float, one_sided: bool
) -> torch.Tensor:
    """``weight * mean((norms - center)^2)``, or with ``max(0, norms - center)`` if one-sided.

    In float32/float64 this is ``dot(dev, dev) * (weight / B)``: one reduction kernel and one
    autograd node instead of ``square`` and ``mean`` (whose backward takes five kernels), which
    is most of the penalty's cost at small critics. Reduced precision keeps ``square().mean()``,
    whose reduction accumulates in float32.
    """
    dev = norms - center if center != 0.0 else norms
    if one_sided:
        dev = torch.relu(dev)
    if dev.dtype in _DOT_DTYPES and dev.ndim == 1 and dev.shape[0] > 0:
        return torch.dot(dev, dev) * (weight / dev.shape[0])
    return dev.square().mean() * weight


def gradient_penalty_and_norms(
    critic: TensorFn,
    real: TensorOrTensors,
    fake: TensorOrTensors,
    *,
    weight: float = 10.0,
    center: float = 1.0,
    one_sided: bool = False,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
) -> PenaltyWithNorms:
    """:func:`gradient_penalty` and the per-sample gradient norms it was computed from.

    Same arguments and errors as :func:`gradient_penalty`; returns a :class:`PenaltyWithNorms`
    ``(penalty, norms)`` whose ``norms`` (shape ``(B,)``, detached) are for logging, at no extra
    cost: :func:`gradient_penalty` is this function without the norms.

    Example:
        >>> from gradlab.penalties import gradient_penalty_and_norms
        >>> critic = torch.nn.Linear(4, 1)
        >>> out = gradient_penalty_and_norms(critic, torch.randn(8, 4), torch.randn(8, 4))
        >>> out.penalty.shape, out.norms.shape
        (torch.Size([]), torch.Size([8]))
    """
    penalty, norms = _gradient_penalty(
        critic, real, fake, weight, center, one_sided, critic_kwargs, scaler, generator
    )
    return PenaltyWithNorms(penalty, norms.detach())


def _gradient_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    fake: TensorOrTensors,
    weight: float,
    center: float,
    one_sided: bool,
    critic_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` (norms not detached) with every check of the public functions.

    The common case (one tensor per sample, no scaler) runs inline with as few Python calls and
    tensor operations as the hand-written step: this is the hot path of a WGAN-GP training loop,
    and at small critics its Python overhead is what the user measures.
    """
    fn = "gradient_penalty"
    if type(weight) is not float or not 0.0 <= weight < _INF:  # fast accept; else full check
        weight = check_nonnegative(fn, "weight", weight)
    if type(center) is not float or not 0.0 <= center < _INF:
        center = check_nonnegative(fn, "center", center)
    r: tuple[torch.Tensor, ...]
    f: tuple[torch.Tensor, ...]
    # The common case, one tensor per sample with matching shape, dtype and device (what
    # check_pair would accept), tested inline: each tensor attribute read here costs.
    single = False
    if isinstance(real, torch.Tensor) and isinstance(fake, torch.Tensor):
        size = real.shape
        single = (
            0 < len(size) <= _MAX_FAST_NDIM
            and size == fake.shape
            and real.dtype == fake.dtype
            and real.is_floating_point()
            and (fake is real or real.device == fake.device)
        )
    if single:
        r, f = (real,), (fake,)  # type: ignore[assignment]
    else:
        r, f = check_pair(fn, real, fake)
    kwargs = _NO_KWARGS if critic_kwargs is None else check_critic_kwargs(fn, critic_kwargs)
    if scaler is not None:
        scaler = check_scaler(fn, scaler)
    check_critic(fn, critic)
    if not single or scaler is not None:
        leaves = detached_interpolate_leaves(r, f, per_sample_uniform(r, generator))
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                return _penalty_raw(fn, critic, leaves, kwargs, scaler, weight, center, one_sided)
        return _penalty_raw(fn, critic, leaves, kwargs, scaler, weight, center, one_sided)

    # One tensor per sample, no scaler: the steps of detached_interpolate_leaves and
    # _penalty_raw, inline. a is drawn directly in the broadcast shape (B, 1, ..., 1): the same
    # numbers as the (B,) draw of per_sample_uniform.
    x, y = r[0], f[0]
    batch, ndim = size[0], len(size)
    shape = (batch,) + _TRAILING_ONES[ndim - 1]
    if generator is None:
        a = torch.rand(shape, dtype=x.dtype, device=x.device)
    else:
        a = uniform_like(x, shape, generator)
    if y is x:  # the interpolate is x itself whatever the draw (drawn anyway: same RNG stream)
        leaf = x.detach().requires_grad_(True)
    else:
        if x.requires_grad or y.requires_grad:
            x, y = x.detach(), y.detach()
        leaf = torch.lerp(x, y, a).requires_grad_(True)
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return _single_penalty(fn, critic, leaf, batch, ndim, kwargs, weight, center, one_sided)
    return _single_penalty(fn, critic, leaf, batch, ndim, kwargs, weight, center, one_sided)


def _single_penalty(
    fn: str,
    critic: TensorFn,
    leaf: torch.Tensor,
    batch: int,
    ndim: int,
    kwargs: Mapping[str, Any],
    weight: float,
    center: float,
    one_sided: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_penalty_raw` for one input tensor of shape ``(batch, ...)`` with ``ndim``
    dimensions and no scaler (grad mode enabled)."""
    outputs = critic(leaf, **kwargs) if kwargs else critic(leaf)
    if not (
        isinstance(outputs, torch.Tensor)
        and outputs.requires_grad
        and outputs.ndim > 0
        and outputs.shape[0] == batch
        and outputs.is_floating_point()
    ):
        check_outputs(fn, outputs, batch)  # raises the precise error
    try:
        g = torch.autograd.grad(outputs, leaf, torch.ones_like(outputs), create_graph=True)[0]
    except RuntimeError as e:
        raise grad_error(fn, e) from None
    norms = torch.linalg.vector_norm(g, dim=_SAMPLE_DIMS[ndim]) if ndim > 1 else g.abs()
    penalty = norm_penalty(norms, weight=weight, center=center, one_sided=one_sided)
    if is_ddp(critic):
        penalty = with_ddp_zero_term(penalty, outputs, critic)
    return penalty, norms


def _penalty_raw(
    fn: str,
    critic: TensorFn,
    leaves: tuple[torch.Tensor, ...],
    kwargs: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None,
    weight: float,
    center: float,
    one_sided: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` of the critic's input gradients at ``leaves`` (grad mode enabled)."""
    outputs, grads = critic_gradients(fn, critic, leaves, kwargs, scaler)
    norms = sample_norms(grads)
    penalty = norm_penalty(norms, weight=weight, center=center, one_sided=one_sided)
    return with_ddp_zero_term(penalty, outputs, critic), norms


def _penalty(
    fn: str,
    critic: TensorFn,
    leaves: tuple[torch.Tensor, ...],
    kwargs: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None,
    weight: float,
    center: float,
    one_sided: bool,
) -> PenaltyWithNorms:
    """The norm penalty of the critic's input gradients at ``leaves`` (grad mode enabled)."""
    penalty, norms = _penalty_raw(fn, critic, leaves, kwargs, scaler, weight, center, one_sided)
    return PenaltyWithNorms(penalty, norms.detach())


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
    generator: torch.Generator | None = None,
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

    The critic is evaluated on fresh leaf tensors (``real``/``fake`` are detached: the penalty is
    a function of the critic's parameters only) and differentiated with
    :func:`torch.autograd.grad`, so neither the caller's tensors nor any parameter's ``.grad`` is
    touched, and no ``backward(create_graph=True)`` reference cycle is made. Works under
    ``torch.no_grad()`` (gradients are enabled inside). For per-sample norms to log, call
    :func:`gradient_penalty_and_norms`.

    Under DistributedDataParallel a zero gradient is sent into the critic's outputs so that a
    penalty-only backward reaches every parameter (as StyleGAN2-ADA does); ``static_graph=True``
    is refused. Under AMP pass ``scaler=`` and call inside the ``torch.autocast`` region; then
    backpropagate ``scaler.scale(loss)`` as usual (see :func:`input_gradient_norms`).

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
        generator: a :class:`torch.Generator` for the interpolation coefficients.

    Returns:
        The scalar penalty, to add to the critic's loss.

    Raises:
        ValueError: mismatched ``real``/``fake`` shapes, a critic output without the batch
            dimension, a negative weight or center, a ``static_graph=True`` DDP critic.
        TypeError: non-tensor or non-floating inputs, a ``scaler`` that is not a GradScaler.
        GraphError: a critic compiled with ``torch.compile`` (it cannot be differentiated twice),
            or a critic whose output does not depend on an input.

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
    return _gradient_penalty(
        critic, real, fake, weight, center, one_sided, critic_kwargs, scaler, generator
    )[0]
