"""StyleGAN2's path length regularizer, as a function and as a stateful module."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from gradlab._errors import GraphError
from gradlab._validate import check_generator, check_nonnegative
from gradlab.penalties._checks import (
    as_tensors,
    check_nonempty,
    check_outputs,
    check_requires_grad,
    check_scaler,
)
from gradlab.penalties._core import input_gradients, per_sample_norms, zero_grad_to
from gradlab.penalties._finite_difference import standard_normal_like

__all__ = ["PathLengthPenalty", "PathLengthResult", "path_length_penalty"]


class PathLengthResult(NamedTuple):
    """What :func:`path_length_penalty` returns.

    Attributes:
        penalty: the scalar penalty (differentiable w.r.t. the generator).
        lengths: per-sample path lengths :math:`\\|J_w^T y\\|_2`, shape ``(B,)``, detached.
        mean: the updated running mean, a detached 0-d tensor (float32, or float64 for float64
            latents); pass it back next time.

    Example:
        >>> from gradlab.penalties import path_length_penalty
        >>> w = torch.randn(4, 8, requires_grad=True)
        >>> images = torch.nn.Linear(8, 3 * 4 * 4)(w).view(4, 3, 4, 4)
        >>> out = path_length_penalty(images, w, mean=0.0)
        >>> out.penalty.ndim, tuple(out.lengths.shape), out.mean.ndim
        (0, (4,), 0)
    """

    penalty: torch.Tensor
    lengths: torch.Tensor
    mean: torch.Tensor


def _check_decay(fn: str, decay: float) -> float:
    decay = check_nonnegative(fn, "decay", decay)
    if decay > 1:
        raise ValueError(
            f"{fn}: decay must be in [0, 1], got {decay!r}. Pass the running mean's EMA "
            "decay (0.01 in StyleGAN2)"
        )
    return decay


def path_length_penalty(
    images: torch.Tensor,
    latents: torch.Tensor,
    *,
    mean: float | torch.Tensor,
    decay: float = 0.01,
    weight: float = 2.0,
    generator: torch.Generator | int | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> PathLengthResult:
    r"""StyleGAN2's path length penalty, stateless (the running mean goes in and comes out).

    .. math::

        \ell_i = \big\|J_{w_i}^{\top} y_i\big\|_2
               = \big\|\nabla_{w_i} \langle g(w_i), y_i\rangle\big\|_2,\qquad
        y \sim \mathcal N(0, I)/\sqrt{HW},

    .. math::

        \bar a \leftarrow \bar a + \beta\,(\tfrac1B \textstyle\sum_i \ell_i - \bar a),\qquad
        \mathrm{PL} = \lambda\,\frac1B \sum_i (\ell_i - \bar a)^2,

    with :math:`\beta` = ``decay``, :math:`\lambda` = ``weight`` and :math:`HW` =
    ``prod(images.shape[2:])``, the pixels per channel. As in the official implementation the
    penalty uses the *updated* mean, which is not detached inside this call (the gradient flows
    through the batch mean with factor :math:`\beta`); the mean returned is detached.

    The length depends on the shape of ``latents``:

    - 2-D ``(B, w_dim)`` (one ``w`` per sample, or 1-D ``(B,)``): the L2 norm of the gradient,
      as above, zero-safe.
    - 3-D ``(B, num_ws, w_dim)`` (``w`` broadcast to every synthesis layer, StyleGAN2-ADA's
      ``ws``): StyleGAN2-ADA's ``pl_grads.square().sum(2).mean(1).sqrt()``, i.e.
      :math:`\ell_i^2 = \frac{1}{num\_ws}\sum_k \|\nabla_{w_{ik}} \langle g, y\rangle\|^2`,
      the mean over ``num_ws`` of the squared norm. Pass the broadcast ``ws`` the images were
      computed from, not the un-broadcast ``(B, w_dim)`` latents: their gradient is the sum over
      ``num_ws`` of the per-layer gradients, a different quantity.

    A batch whose lengths are not all finite (an overflow under AMP, a NaN in the generator)
    does not update the mean: the previous one is returned (and used in that batch's penalty,
    which is then not finite either), so the next finite batch is unaffected. No host
    synchronisation is needed for this.

    A zero gradient is also sent into ``images``, so that under DistributedDataParallel a
    penalty-only backward reaches every parameter of the generator (StyleGAN2-ADA does the same).
    The penalty differentiates the generator twice, which FSDP does not support: this function
    sees only tensors and cannot refuse an FSDP generator, so wrap the generator with DDP.

    Args:
        images: generator output ``(B, C, H, W)`` (at least 3-D), computed from ``latents``.
        latents: the latents ``w`` that produced ``images``, ``(B, w_dim)`` or
            ``(B, num_ws, w_dim)``, ``requires_grad=True``.
        mean: the running mean of the path length :math:`\bar a` so far (0 at the start).
        decay: :math:`\beta \in [0, 1]` (0.01 in StyleGAN2).
        weight: :math:`\lambda \ge 0` (2 in StyleGAN2).
        generator: a :class:`torch.Generator` or an int seed for :math:`y`.
        scaler: a :class:`torch.amp.GradScaler` for mixed precision.

    Returns:
        A :class:`PathLengthResult` ``(penalty, lengths, mean)``.

    Raises:
        ValueError: an empty batch, ``images`` below 3-D or with another batch size, latents that
            do not require grad or with more than 3 dimensions, ``decay`` outside [0, 1],
            negative ``weight``.
        GraphError: ``images`` that do not depend on ``latents``.

    Example:
        >>> from gradlab.penalties import path_length_penalty
        >>> w = torch.randn(4, 8, requires_grad=True)
        >>> images = torch.nn.Linear(8, 3 * 4 * 4)(w).view(4, 3, 4, 4)
        >>> out = path_length_penalty(images, w, mean=0.0)
        >>> out.penalty.shape, out.lengths.shape, out.mean.shape
        (torch.Size([]), torch.Size([4]), torch.Size([]))

    References:
        Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020.
    """
    fn = "path_length_penalty"
    decay = _check_decay(fn, decay)
    weight = check_nonnegative(fn, "weight", weight)
    if isinstance(mean, bool) or not isinstance(mean, (int, float, torch.Tensor)):
        raise TypeError(
            f"{fn}: mean must be a float or a 0-d tensor, got {mean!r}. Pass the running mean "
            "returned by the previous call (result.mean), 0.0 at the start"
        )
    (w,) = as_tensors(fn, "latents", latents)
    check_nonempty(fn, "latents", (w,))
    if w.ndim > 3:
        raise ValueError(
            f"{fn}: latents has shape {tuple(w.shape)}; it must be (B, w_dim) or StyleGAN2's "
            "broadcast (B, num_ws, w_dim)"
        )
    check_requires_grad(fn, "latents", (w,))
    check_outputs(fn, images, w.shape[0], arg="images")
    if images.ndim < 3:
        raise ValueError(
            f"{fn}: images has shape {tuple(images.shape)}; it must be (B, C, H, W) (at least "
            "3-D: y is scaled by 1/sqrt(prod(images.shape[2:])))"
        )
    scaler = check_scaler(fn, scaler)
    y = standard_normal_like(images, check_generator(fn, "generator", generator))
    y = y / math.sqrt(math.prod(images.shape[2:]))
    with torch.enable_grad():
        try:
            grads = input_gradients(fn, images * y, (w,), create_graph=True, scaler=scaler)
        except GraphError:
            raise GraphError(
                f"{fn}: images do not depend on latents; pass the latents w that the images "
                "were computed from (with requires_grad=True set before the forward pass)"
            ) from None
        lengths = per_sample_norms(grads)
        if w.ndim == 3:  # sqrt(mean over num_ws of the squared norm), zero-safe
            lengths = lengths * (1.0 / math.sqrt(w.shape[1]))
        dtype = torch.promote_types(lengths.dtype, torch.float32)  # no float16 running mean
        if isinstance(mean, torch.Tensor):
            prev = mean.detach().to(device=lengths.device, dtype=dtype)
        else:
            prev = torch.tensor(float(mean), device=lengths.device, dtype=dtype)
        batch_mean = lengths.to(dtype).mean()
        new_mean = torch.where(batch_mean.isfinite(), prev + decay * (batch_mean - prev), prev)
        penalty = (lengths - new_mean).square().mean() * weight
        penalty = zero_grad_to(penalty, images)
    return PathLengthResult(penalty, lengths.detach(), new_mean.detach())


class PathLengthPenalty(nn.Module):
    r"""StyleGAN2's path length regularizer with its running mean as state.

    Calling it computes :func:`path_length_penalty` with the stored mean, stores the updated mean
    (a buffer named ``mean``, so it is in :meth:`~torch.nn.Module.state_dict` and follows
    ``.to(device)``) and keeps the last per-sample lengths in ``last_lengths`` (detached) for
    logging. Latents may be ``(B, w_dim)`` or StyleGAN2-ADA's broadcast ``(B, num_ws, w_dim)`` (see
    :func:`path_length_penalty`).

    A batch with a non-finite length leaves the stored mean as it was (the penalty returned for
    it is not finite: skip that step, as GradScaler does) and warns, once per module. Telling
    costs one host read of a flag per call.

    Args:
        decay: EMA decay :math:`\beta` of the mean path length (0.01 in StyleGAN2).
        weight: :math:`\lambda` (2 in StyleGAN2).

    Example:
        >>> from gradlab.penalties import PathLengthPenalty
        >>> pl = PathLengthPenalty()
        >>> w = torch.randn(4, 8, requires_grad=True)
        >>> images = torch.nn.Linear(8, 3 * 4 * 4)(w).view(4, 3, 4, 4)
        >>> penalty = pl(images, w)
        >>> pl.last_lengths.shape, sorted(pl.state_dict())
        (torch.Size([4]), ['mean'])
    """

    mean: torch.Tensor
    last_lengths: torch.Tensor | None

    def __init__(self, *, decay: float = 0.01, weight: float = 2.0) -> None:
        super().__init__()
        fn = "PathLengthPenalty"
        self.decay = _check_decay(fn, decay)
        self.weight = check_nonnegative(fn, "weight", weight)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float32))
        self.last_lengths = None
        self._warned_nonfinite = False

    def forward(
        self,
        images: torch.Tensor,
        latents: torch.Tensor,
        *,
        generator: torch.Generator | int | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> torch.Tensor:
        """The penalty for ``images`` computed from ``latents``; updates the running mean."""
        out = path_length_penalty(
            images,
            latents,
            mean=self.mean,
            decay=self.decay,
            weight=self.weight,
            generator=generator,
            scaler=scaler,
        )
        with torch.no_grad():
            self.mean.copy_(out.mean)
        self.last_lengths = out.lengths
        if not self._warned_nonfinite and not bool(out.lengths.isfinite().all()):
            self._warned_nonfinite = True
            warnings.warn(
                "PathLengthPenalty: a batch had non-finite path lengths (NaN or inf: an overflow "
                "under mixed precision, or a NaN in the generator); the running mean was not "
                "updated from it and the penalty returned for it is not finite: skip that step "
                "(GradScaler does so for inf/NaN gradients). (Shown once per module.)",
                RuntimeWarning,
                stacklevel=2,
            )
        return out.penalty

    def extra_repr(self) -> str:
        return f"decay={self.decay}, weight={self.weight}"
