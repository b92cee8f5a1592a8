"""The one zero-centred penalty R1 and R2 call: validation, then the exact core
(:func:`~gradlab.penalties._core.exact_penalty`) or the finite-difference estimator
(:func:`~gradlab.penalties._finite_difference.finite_difference_penalty`), with or without the
caller's forward pass (``outputs=``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradlab._typing import TensorFn, TensorOrTensors
from gradlab._validate import (
    check_choice,
    check_generator,
    check_nonnegative,
    check_positive,
    message,
)
from gradlab.penalties._checks import (
    METHODS,
    as_tensors,
    check_critic,
    check_critic_kwargs,
    check_nonempty,
    check_outputs,
    check_requires_grad,
    check_scaler,
)
from gradlab.penalties._core import (
    PenaltyWithNorms,
    exact_penalty,
    make_spec,
    penalty_of_outputs,
)
from gradlab.penalties._finite_difference import DEFAULT_SIGMA, finite_difference_penalty
from gradlab.penalties._registry import PenaltyEntry, register_penalty

__all__ = ["register_zero_centred", "with_norms", "zero_centred_penalty"]


def zero_centred_penalty(
    caller: tuple[str, str],
    critic: TensorFn,
    x: TensorOrTensors,
    gamma: float,
    outputs: torch.Tensor | None,
    critic_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
    method: str,
    sigma: float | None,
    generator: torch.Generator | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, squared_norms)`` (not detached; estimates for finite differences) of
    ``gamma/2 * mean_i ||grad D(x_i)||^2``. ``caller`` is ``(fn, arg)``: the public function
    and the name of its sample argument, for messages; the other arguments are those of its
    signature, in order (R1 and R2 pass them positionally, their twins through
    :func:`~gradlab.penalties._registry.bind`).
    """
    fn, arg = caller
    gamma = check_nonnegative(fn, "gamma", gamma)
    method = check_choice(fn, "method", method, METHODS)
    xs = as_tensors(fn, arg, x)
    check_nonempty(fn, arg, xs)
    exact = method == "exact"
    step = DEFAULT_SIGMA
    if exact:
        if sigma is not None or generator is not None:
            name, value = ("sigma", sigma) if sigma is not None else ("generator", generator)
            raise ValueError(
                message(
                    fn,
                    name,
                    "None with method='exact' (the exact method draws nothing)",
                    value,
                    f"Pass method='finite-difference' to use it, or drop {name}=",
                )
            )
        if scaler is not None:
            scaler = check_scaler(fn, scaler)
    else:
        if sigma is not None:
            step = check_positive(fn, "sigma", sigma)
        generator = check_generator(fn, "generator", generator)
        if scaler is not None:
            raise ValueError(
                message(
                    fn,
                    "scaler",
                    "None with method='finite-difference' (no input gradient to scale)",
                    scaler,
                    "Drop scaler= and scale the loss with scaler.scale(loss).backward() as usual",
                )
            )
    check_critic(fn, critic, exact=exact, finite_difference=True)
    spec = make_spec(fn, gamma / 2, 0.0, False, True)
    if outputs is None:
        kwargs = check_critic_kwargs(fn, critic_kwargs)
        if exact:
            if len(xs) == 1:  # the common case, without a generator expression
                leaves: tuple[torch.Tensor, ...] = (xs[0].detach().requires_grad_(True),)
            else:
                leaves = tuple(t.detach().requires_grad_(True) for t in xs)
            penalty, sq = exact_penalty(spec, critic, leaves, kwargs, scaler)
        else:
            penalty, sq = finite_difference_penalty(spec, critic, xs, kwargs, None, step, generator)
        return penalty, sq
    if exact:
        if critic_kwargs is not None:
            raise ValueError(
                message(
                    fn,
                    "critic_kwargs",
                    "None when outputs= is given with the exact method (the critic is not called)",
                    critic_kwargs,
                    "Pass the keyword arguments to the forward pass that made outputs",
                )
            )
        check_requires_grad(fn, arg, xs)
    check_outputs(fn, outputs, xs[0].shape[0], arg="outputs")
    if exact:
        with torch.enable_grad():
            penalty, sq = penalty_of_outputs(spec, critic, outputs, xs, scaler)
        return penalty, sq
    kwargs = check_critic_kwargs(fn, critic_kwargs)  # the perturbed forward needs them too
    return finite_difference_penalty(spec, critic, xs, kwargs, outputs, step, generator)


def with_norms(penalty: torch.Tensor, squared_norms: torch.Tensor) -> PenaltyWithNorms:
    """What the ``*_and_norms`` twins of R1 and R2 return: the per-sample norms detached."""
    return PenaltyWithNorms(penalty, squared_norms.detach().sqrt())


def register_zero_centred(
    name: str, fn: Callable[..., torch.Tensor], twin: Callable[..., PenaltyWithNorms], sample: str
) -> PenaltyEntry:
    """Register a zero-centred penalty on one sample argument (R1: ``"real"``, R2: ``"fake"``)."""
    entry = PenaltyEntry(name, fn, (sample,), zero_centred=True, with_norms=twin, methods=METHODS)
    return register_penalty(entry)
