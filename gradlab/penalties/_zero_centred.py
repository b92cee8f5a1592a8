"""The front end R1 and R2 share: validation, then the exact core or the finite-difference
estimator, with or without the caller's forward pass (``outputs=``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab.penalties._checks import (
    as_tensors,
    check_critic,
    check_critic_kwargs,
    check_method,
    check_nonempty,
    check_nonnegative,
    check_outputs,
    check_positive,
    check_requires_grad,
    check_scaler,
)
from gradlab.penalties._core import exact_penalty, make_spec, penalty_of_outputs
from gradlab.penalties._finite_difference import DEFAULT_SIGMA, finite_difference_penalty

__all__ = ["ARGS_DOC", "FINITE_DIFFERENCE_DOC", "zero_centred_penalty"]

_INF = math.inf
_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


def zero_centred_penalty(
    fn: str,
    arg: str,
    critic: TensorFn,
    x: TensorOrTensors,
    *,
    gamma: float,
    outputs: torch.Tensor | None,
    critic_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    method: str,
    sigma: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, squared_norms)`` (not detached; estimates for finite differences) of
    ``gamma/2 * mean_i ||grad D(x_i)||^2`` for the public function ``fn`` whose input argument is
    named ``arg``; the arguments are those of its signature.

    The common case (a float ``gamma``, one non-empty floating tensor) is accepted inline: at
    small critics the Python overhead of the checks is what the user measures.
    """
    if type(gamma) is not float or not 0.0 <= gamma < _INF:
        gamma = check_nonnegative(fn, "gamma", gamma)
    if method != "exact" and method != "finite-difference":
        check_method(fn, method)
    xs: tuple[torch.Tensor, ...]
    if type(x) is torch.Tensor and x.ndim > 0 and x.shape[0] > 0 and x.is_floating_point():
        xs = (x,)
    else:
        xs = as_tensors(fn, arg, x)
        check_nonempty(fn, arg, xs)
    exact = method == "exact"
    if exact:
        if sigma is not None or generator is not None:
            name = "sigma" if sigma is not None else "generator"
            raise ValueError(
                f"{fn}: {name}= is used only by method='finite-difference' (the exact method "
                f"draws nothing); pass method='finite-difference' or drop {name}="
            )
        if scaler is not None:
            scaler = check_scaler(fn, scaler)
    else:
        sigma = DEFAULT_SIGMA if sigma is None else check_positive(fn, "sigma", sigma)
        if scaler is not None:
            raise ValueError(
                f"{fn}: scaler= has no effect with method='finite-difference' (it takes no input "
                "gradient, so there is nothing to scale); drop scaler= and scale the loss with "
                "scaler.scale(loss).backward() as usual"
            )
    check_critic(fn, critic, exact=exact)
    spec = make_spec(fn, gamma / 2, 0.0, False, True)
    if outputs is None:
        kwargs = _NO_KWARGS if critic_kwargs is None else check_critic_kwargs(fn, critic_kwargs)
        if exact:
            if len(xs) == 1:
                leaves: tuple[torch.Tensor, ...] = (xs[0].detach().requires_grad_(True),)
            else:
                leaves = tuple(t.detach().requires_grad_(True) for t in xs)
            penalty, sq = exact_penalty(spec, critic, leaves, kwargs, scaler)
        else:
            assert sigma is not None
            penalty, sq = finite_difference_penalty(
                spec, critic, xs, kwargs=kwargs, outputs=None, sigma=sigma, generator=generator
            )
        return penalty, sq
    if exact:
        if critic_kwargs is not None:
            raise ValueError(
                f"{fn}: critic_kwargs has no effect when outputs= is given with the exact method "
                "(the critic is not called); pass the keyword arguments to the forward pass that "
                "made outputs"
            )
        check_requires_grad(fn, arg, xs)
    check_outputs(fn, outputs, xs[0].shape[0], arg="outputs")
    if exact:
        with torch.enable_grad():
            penalty, sq = penalty_of_outputs(spec, critic, outputs, xs, scaler)
        return penalty, sq
    assert sigma is not None
    kwargs = check_critic_kwargs(fn, critic_kwargs)  # the perturbed forward needs them too
    return finite_difference_penalty(
        spec, critic, xs, kwargs=kwargs, outputs=outputs, sigma=sigma, generator=generator
    )


ARGS_DOC = r"""
    Args:
        critic: the critic, called as ``critic(*x, **critic_kwargs)``; scores of shape ``(B,)``
            or ``(B, ...)`` (several per sample are summed).
        {arg}: {what} samples ``(B, ...)``, or a tuple of tensors for a critic with several inputs.
        gamma: :math:`\gamma \ge 0`. StyleGAN2/StyleGAN2-ADA's ``r1_gamma`` is this
            :math:`\gamma` (their loss is ``r1_penalty * (r1_gamma / 2)``); GAN_stability's
            ``reg_param`` multiplies the squared norm without the 1/2, so ``reg_param = r`` is
            ``gamma = 2 * r`` here.
        outputs: the critic's outputs on ``{arg}`` from a forward pass you already made (e.g. the
            one of the adversarial loss, as StyleGAN2 does), to avoid a second forward. Then
            ``{arg}`` must be the very tensors that produced ``outputs`` and, for the exact
            method, must require grad (``x = x.detach().requires_grad_(True); outputs =
            critic(x)``); the critic is then called only on the perturbed samples (finite
            difference) or not at all (exact). Without it the critic is called on fresh leaf
            copies of ``{arg}``.
        critic_kwargs: extra keyword arguments for the critic (e.g. ``{{"labels": y}}``). With
            ``outputs``: refused for the exact method (the critic is not called); for finite
            differences pass the ones ``outputs`` was computed with (the critic is called on the
            perturbed samples).
        scaler: a :class:`torch.amp.GradScaler` for mixed precision (exact method only; see
            :func:`input_gradient_norms`).
        method: ``"exact"`` (default: one double backward) or ``"finite-difference"`` (the
            estimator above: first-order backward only, works through FSDP and
            ``torch.compile``).
        sigma: the finite-difference step :math:`\sigma > 0` (default 0.01); finite-difference
            only.
        generator: a :class:`torch.Generator` for :math:`\epsilon` (one :func:`torch.randn` per
            input, in order); finite-difference only.
"""

FINITE_DIFFERENCE_DOC = r"""
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
    :math:`\|\nabla D\|^2\chi^2_1` (variance :math:`2\|\nabla D\|^4`), so the batch mean has
    relative standard deviation :math:`\sqrt{2/B}`. Choosing :math:`\sigma`: small against the
    scale on which the critic's gradient changes (a fraction of the data's per-element spread:
    0.01 for data in [-1, 1]) for a small bias, but large enough that the difference stands out
    of the rounding of :math:`D`: the relative error of one estimate is about
    :math:`2u|D|/(\sigma\|\nabla D\|)` with unit roundoff :math:`u` (:math:`6\cdot10^{-8}` in
    float32, :math:`5\cdot10^{-4}` in float16, :math:`4\cdot10^{-3}` in bfloat16), so under
    reduced-precision autocast use a larger :math:`\sigma` or run the critic's last layer in
    float32. The difference itself is taken in at least float32.
"""
