"""Random interpolates between real and fake samples, one coefficient per sample."""

from __future__ import annotations

import torch

from gradlab._typing import TensorOrTensors
from gradlab.penalties._checks import check_pair

__all__ = ["interpolate", "per_sample_uniform", "uniform_like"]


def uniform_like(
    x: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """``U[0, 1)`` samples of ``shape`` in ``x``'s dtype on ``x``'s device, drawn from
    ``generator`` (on the generator's own device, then moved, so a CPU generator works for CUDA
    data)."""
    if generator is None:
        return torch.rand(shape, dtype=x.dtype, device=x.device)
    u = torch.rand(shape, dtype=x.dtype, device=generator.device, generator=generator)
    return u.to(x.device, non_blocking=True)


def per_sample_uniform(
    xs: tuple[torch.Tensor, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """One ``U[0, 1)`` coefficient per sample, shape ``(B,)``, in the first input's dtype."""
    return uniform_like(xs[0], (xs[0].shape[0],), generator)


def lerp_per_sample(
    real: tuple[torch.Tensor, ...], fake: tuple[torch.Tensor, ...], a: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``real + a * (fake - real)`` with ``a`` of shape ``(B,)`` broadcast to each input.

    Differentiable w.r.t. ``real`` and ``fake`` (callers detach them when they must not be).
    """
    return tuple(
        r if f is r else torch.lerp(r, f, a.to(r.dtype).view((-1,) + (1,) * (r.ndim - 1)))
        for r, f in zip(real, fake)
    )


def detached_interpolate_leaves(
    real: tuple[torch.Tensor, ...], fake: tuple[torch.Tensor, ...], a: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Fresh leaves (``requires_grad=True``) at ``real + a (fake - real)``, with no graph to
    ``real``/``fake``. Where ``fake is real`` the leaf shares ``real``'s data (no arithmetic)."""
    out = []
    for r, f in zip(real, fake):
        x = r.detach()
        if f is not r:
            x = torch.lerp(x, f.detach(), a.to(r.dtype).view((-1,) + (1,) * (r.ndim - 1)))
        out.append(x.requires_grad_(True))
    return tuple(out)


def interpolate(
    real: TensorOrTensors,
    fake: TensorOrTensors,
    *,
    generator: torch.Generator | None = None,
) -> TensorOrTensors:
    r"""Random points on the lines between real and fake samples (WGAN-GP's :math:`\hat x`).

    .. math::

        \hat x_i = x_i + a_i\,(\tilde x_i - x_i), \qquad a_i \sim U[0, 1),

    with **one** coefficient :math:`a_i` per sample, broadcast over the sample's shape and shared
    by all of a sample's inputs when ``real``/``fake`` are tuples (a per-pixel coefficient, or
    one for the whole batch, are common bugs in copied code). Where ``real == fake`` the result is
    exactly ``real`` whatever the draw.

    The coefficients are drawn with :func:`torch.rand` in the dtype of the first input, on the
    ``generator``'s device (then moved), so a seeded CPU generator reproduces the same
    interpolates for data on any device. The result is differentiable with respect to ``real``
    and ``fake`` if they require grad; the penalties detach their inputs first.

    Args:
        real: real samples, a tensor ``(B, ...)`` or a tuple of them (several critic inputs).
        fake: fake samples, same structure, shapes, dtypes and devices as ``real``.
        generator: a :class:`torch.Generator` for the coefficients (for reproducibility).

    Returns:
        The interpolates: a tensor for tensor inputs, a tuple (same order) for tuples.

    Raises:
        ValueError: if the structures, shapes, dtypes or devices of ``real`` and ``fake`` differ.

    Example:
        >>> from gradlab.penalties import interpolate
        >>> real, fake = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
        >>> x_hat = interpolate(real, fake, generator=torch.Generator().manual_seed(0))
        >>> x_hat.shape
        torch.Size([3, 2, 2])
        >>> x_hat.flatten(1).std(dim=1)  # constant within each sample
        tensor([0., 0., 0.])
    """
    r, f = check_pair("interpolate", real, fake)
    out = lerp_per_sample(r, f, per_sample_uniform(r, generator))
    return out[0] if isinstance(real, torch.Tensor) else out
