r"""The finite-difference estimator of R1/R2: no double backward.

.. math::

    \widehat{\|\nabla D(x_i)\|^2} = \frac{\big(D(x_i + \sigma\epsilon_i) - D(x_i)\big)^2}{\sigma^2},
    \qquad \epsilon_i \sim \mathcal N(0, I),

(the "approximated R1" of Seaweed-APT, arXiv:2501.08316, with the :math:`1/\sigma^2` that makes
it an estimate of the squared norm, so that ``gamma`` means what it means for exact R1).

Bias. Taylor-expand :math:`\Delta = D(x + \sigma\epsilon) - D(x) = \sigma g^\top\epsilon +
\frac{\sigma^2}{2}\epsilon^\top H\epsilon + \frac{\sigma^3}{6}T[\epsilon,\epsilon,\epsilon] +
O(\sigma^4)` (gradient :math:`g`, Hessian :math:`H`, third derivative :math:`T` at :math:`x`).
The odd moments of :math:`\epsilon` vanish, so

.. math::

    \mathbb E\,\frac{\Delta^2}{\sigma^2} = \|g\|^2 + \sigma^2\Big(
        \tfrac14\big((\operatorname{tr}H)^2 + 2\|H\|_F^2\big)
        + g^\top\nabla\operatorname{tr}H\Big) + O(\sigma^4):

exact in expectation for a linear critic, biased by exactly
:math:`\frac{\sigma^2}{4}((\operatorname{tr}A)^2 + 2\|A\|_F^2)` for a quadratic one
(:math:`H = A`, :math:`T = 0`).

Variance. To leading order :math:`\Delta/\sigma = g^\top\epsilon \sim \mathcal N(0, \|g\|^2)`,
so each sample's estimate is :math:`\|g\|^2\chi^2_1`: variance :math:`2\|g\|^4`, and the batch
mean of :math:`B` samples has relative standard deviation :math:`\sqrt{2/B}` (18% at
:math:`B = 64`). The parameter gradient is as noisy; GAN training tolerates it (the adversarial
gradient is a minibatch estimate too).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from gradlab._validate import message
from gradlab.penalties._checks import check_outputs
from gradlab.penalties._core import PenaltySpec

__all__ = [
    "DEFAULT_SIGMA",
    "check_outputs_reproduce",
    "finite_difference_penalty",
    "standard_normal_like",
]

#: The step used when ``sigma`` is not given: 1% of data scaled to [-1, 1] or unit variance.
DEFAULT_SIGMA = 0.01


def standard_normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """:math:`\\mathcal N(0, I)` of ``x``'s shape and dtype on ``x``'s device, drawn from
    ``generator`` on the generator's own device (then moved, so a CPU generator works for CUDA
    data)."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    e = torch.randn(x.shape, dtype=x.dtype, device=generator.device, generator=generator)
    return e.to(x.device, non_blocking=True)


def finite_difference_penalty(
    spec: PenaltySpec,
    critic: Any,
    xs: tuple[torch.Tensor, ...],
    kwargs: Mapping[str, Any],
    outputs: torch.Tensor | None,
    sigma: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, estimates)``: ``spec.weight * mean_i e_i`` with the per-sample estimates
    ``e_i = (D(x_i + sigma eps_i) - D(x_i))^2 / sigma^2`` of the squared input-gradient norm (not
    detached). ``outputs`` is ``D(x)`` from the caller's forward pass (checked on first use, see
    :func:`check_outputs_reproduce`), or ``None`` to compute it.

    :math:`\\epsilon` is drawn with one :func:`torch.randn` per input, in order, in each input's
    dtype. Several scores per sample are summed (as the exact penalty differentiates their sum).
    The difference is taken in at least float32.
    """
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return finite_difference_penalty(spec, critic, xs, kwargs, outputs, sigma, generator)
    fn, batch = spec.fn, xs[0].shape[0]
    base = tuple(x.detach() for x in xs)
    shifted = tuple(torch.add(x, standard_normal_like(x, generator), alpha=sigma) for x in base)
    d_shift = critic(*shifted, **kwargs) if kwargs else critic(*shifted)
    check_outputs(fn, d_shift, batch)
    if outputs is None:
        outputs = critic(*base, **kwargs) if kwargs else critic(*base)
        check_outputs(fn, outputs, batch)
    else:
        if outputs.shape != d_shift.shape:
            raise ValueError(
                message(
                    fn,
                    "outputs",
                    f"the critic's output on these inputs, of shape {tuple(d_shift.shape)}",
                    outputs,
                    "Pass outputs=critic(x, **critic_kwargs) for the same x",
                )
            )
        check_outputs_reproduce(fn, critic, base, kwargs, outputs)
    acc = torch.promote_types(d_shift.dtype, torch.float32)
    diff = d_shift.to(acc) - outputs.to(acc)
    if diff.ndim > 1:
        diff = diff.flatten(1).sum(dim=1)
    estimates = (diff * (1.0 / sigma)).square()
    return estimates.mean() * spec.weight, estimates


# (critic, sorted critic_kwargs names) already seen to reproduce their outputs= (weakly keyed on
# the critic; at most one extra forward per critic and keyword set, whatever the thread).
_REPRODUCED: weakref.WeakKeyDictionary[Any, set[tuple[str, ...]]] = weakref.WeakKeyDictionary()


def check_outputs_reproduce(
    fn: str,
    critic: Any,
    base: tuple[torch.Tensor, ...],
    kwargs: Mapping[str, Any],
    outputs: torch.Tensor,
) -> None:
    """On the first call per critic and set of ``critic_kwargs`` names, evaluate the critic on
    the unperturbed inputs (no grad) and refuse ``outputs`` it does not reproduce.

    The finite difference subtracts ``outputs`` from the critic's output on the perturbed
    inputs, called with ``critic_kwargs``. If ``outputs`` came from another call (a conditional
    critic given its labels there but not in ``critic_kwargs``, other inputs, another critic)
    the difference is of order 1 instead of ``sigma`` and the estimate silently wrong by orders
    of magnitude; this makes that loud at the cost of one forward pass on first use. The
    tolerance is the square root of the output dtype's epsilon, relative to the largest output
    (rounding of a repeated forward is far below it; a wrong call is far above it).
    """
    keys = tuple(sorted(kwargs))
    try:
        seen = _REPRODUCED.get(critic)
    except TypeError:  # not weakly referenceable: check every call
        seen = None
    if seen is not None and keys in seen:
        return
    with torch.no_grad():
        again = critic(*base, **kwargs) if kwargs else critic(*base)
    if isinstance(again, torch.Tensor) and again.shape == outputs.shape:
        want = outputs.detach()
        tol = torch.finfo(want.dtype).eps ** 0.5 if want.is_floating_point() else 0.0
        scale = float(want.abs().max()) if want.numel() else 0.0
        if torch.allclose(again.to(want.dtype), want, rtol=tol, atol=tol * max(scale, 1.0)):
            try:
                _REPRODUCED.setdefault(critic, set()).add(keys)
            except TypeError:
                pass
            return
        gap = float((again.to(want.dtype) - want).abs().max())
    else:
        gap = float("nan")
    raise ValueError(
        message(
            fn,
            "outputs",
            f"what critic(x, **critic_kwargs) returns with critic_kwargs names {list(keys)}, "
            f"which differs from it by up to {gap:.3g}",
            outputs,
            "With method='finite-difference' the critic is called again on perturbed inputs and "
            "needs the keyword arguments outputs was computed with: pass them as critic_kwargs "
            "(e.g. critic_kwargs={'labels': y} for outputs=critic(x, labels=y)). A critic that "
            "is random in training mode (dropout) cannot reuse outputs=: drop outputs=",
        )
    )
