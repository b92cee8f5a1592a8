"""Random interpolates between real and fake samples, one coefficient per sample."""

from __future__ import annotations

import torch

from gradlab._typing import TensorOrTensors
from gradlab._validate import check_generator
from gradlab.penalties._checks import check_pair

__all__ = [
    "Perturbation",
    "interpolate",
    "interpolate_leaves",
    "per_sample_coefficients",
    "perturb",
    "uniform_like",
]


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


# (1,) * k for the per-sample coefficient's broadcast shape (B, 1, ..., 1), k < 8 precomputed.
_ONES = tuple((1,) * k for k in range(8))


def _coefficient_shape(x: torch.Tensor) -> tuple[int, ...]:
    k = x.ndim - 1
    return (x.shape[0],) + (_ONES[k] if k < len(_ONES) else (1,) * k)


def per_sample_coefficients(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One ``U[0, 1)`` coefficient per sample in ``x``'s dtype, drawn directly in the broadcast
    shape ``(B, 1, ..., 1)`` of ``x`` (the same numbers as a ``(B,)`` draw)."""
    return uniform_like(x, _coefficient_shape(x), generator)


def _lerp(r: torch.Tensor, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``r + a (f - r)`` with the per-sample ``a`` reshaped to ``r``'s dimensions (``r`` itself
    where ``f is r``)."""
    if f is r:
        return r
    if a.ndim != r.ndim or a.dtype != r.dtype:
        a = a.to(r.dtype).reshape((-1,) + (1,) * (r.ndim - 1))
    return torch.lerp(r, f, a)


def interpolate_leaves(
    real: tuple[torch.Tensor, ...],
    fake: tuple[torch.Tensor, ...],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, ...]:
    """Fresh leaves (``requires_grad=True``) at ``real + a (fake - real)``, one ``a`` per sample
    shared by all inputs, with no graph to ``real``/``fake``. Where ``fake is real`` the leaf
    shares ``real``'s data (the coefficients are drawn anyway, so the generator advances the
    same).

    The common case (one input) is written with as few Python calls as a hand-written step:
    at small critics they are a visible part of the penalty's cost.
    """
    r, f = real[0], fake[0]
    k = r.ndim - 1
    shape = (r.shape[0],) + _ONES[k] if k < len(_ONES) else _coefficient_shape(r)
    if generator is None:
        a = torch.rand(shape, dtype=r.dtype, device=r.device)
    else:
        a = uniform_like(r, shape, generator)
    if len(real) > 1:
        return tuple(_leaf(x, y, a) for x, y in zip(real, fake))
    if f is r:
        return (r.detach().requires_grad_(True),)
    if r.requires_grad or f.requires_grad:
        r, f = r.detach(), f.detach()
    return (torch.lerp(r, f, a).requires_grad_(True),)


def _leaf(r: torch.Tensor, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if r.requires_grad or f.requires_grad:
        r, f = r.detach(), (r if f is r else f.detach())
    x = _lerp(r, f, a)
    return (x.detach() if x is r else x).requires_grad_(True)


def perturb(
    xs: tuple[torch.Tensor, ...], noise_scale: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, ...]:
    """DRAGAN's perturbed points ``x + noise_scale * std(x) * U[0, 1)`` (std over the batch)."""
    out = []
    for x in xs:
        std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
        out.append(x + (noise_scale * std) * uniform_like(x, tuple(x.shape), generator))
    return tuple(out)


class Perturbation:
    """The far end of DRAGAN's interpolates, in place of fake samples: the real samples
    perturbed by :func:`perturb` with ``noise_scale`` (not validated here: the penalty checks it
    in its turn, see :func:`~gradlab.penalties.wgan_gp.interpolates_penalty`)."""

    __slots__ = ("noise_scale",)

    def __init__(self, noise_scale: float) -> None:
        self.noise_scale = noise_scale


def interpolate(
    real: TensorOrTensors,
    fake: TensorOrTensors,
    *,
    generator: torch.Generator | int | None = None,
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
        generator: a :class:`torch.Generator` or an int seed for the coefficients.

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
    a = per_sample_coefficients(r[0], check_generator("interpolate", "generator", generator))
    out = tuple(_lerp(x, y, a) for x, y in zip(r, f))
    return out[0] if isinstance(real, torch.Tensor) else out
