"""Shared pieces of gradlab.testing: argument checks, step sizes and tolerances per dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_TOLERANCES",
    "METHODS",
    "NOISE_FACTOR",
    "STEP_SIZES",
    "as_outputs",
    "check_choice",
    "check_fn",
    "check_inputs",
    "check_positive",
    "default_step",
    "default_tolerances",
    "least_precise",
    "machine_eps",
    "same_layout",
]

#: Finite-difference methods: name -> number of function evaluations per perturbed direction.
METHODS = {"central": 2, "richardson": 4}

#: Base step per (method, dtype). The step for element ``k`` is ``eps * max(1, |x_k|)``.
#: Central differences balance truncation ``O(eps^2)`` against rounding ``O(u / eps)`` (``u``
#: the unit roundoff), Richardson extrapolation ``O(eps^4)`` against ``O(u / eps)``.
STEP_SIZES: dict[str, dict[torch.dtype, float]] = {
    "central": {torch.float64: 5e-6, torch.float32: 5e-3},
    "richardson": {torch.float64: 1e-3, torch.float32: 3e-2},
}

#: Default ``(atol, rtol)`` per dtype (the least precise dtype among inputs and outputs rules).
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-5),
    torch.float32: (1e-3, 1e-2),
}

#: Rounding allowance: ``NOISE_FACTOR[method] * u * |f(x)| / step`` is added to the tolerance.
NOISE_FACTOR = {"central": 4.0, "richardson": 12.0}

_SUPPORTED = (torch.float32, torch.float64)


def machine_eps(dtype: torch.dtype) -> float:
    """Unit roundoff of a floating dtype."""
    return float(torch.finfo(dtype).eps)


def check_fn(fn: Any, caller: str) -> None:
    """Raise TypeError unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(
            f"{caller}: fn must be a callable taking the input tensors, got "
            f"{type(fn).__name__}; pass the function first, then the tensors"
        )


def check_inputs(inputs: Sequence[Any], caller: str) -> tuple[torch.Tensor, ...]:
    """Validate the positional inputs and return detached copies (never the caller's tensors)."""
    if len(inputs) == 0:
        raise TypeError(f"{caller}: no input tensors given; call {caller}(fn, x, ...)")
    for k, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{caller}: input {k} is a {type(x).__name__}, not a torch.Tensor; every "
                "positional argument after fn is differentiated, so bind non-tensor arguments "
                "with functools.partial or a lambda"
            )
        if x.layout != torch.strided:
            raise TypeError(
                f"{caller}: input {k} has layout {x.layout}; only dense (strided) tensors are "
                "supported, convert it with .to_dense()"
            )
        if x.is_complex():
            raise TypeError(
                f"{caller}: input {k} is complex ({x.dtype}); complex inputs are not supported, "
                "check the real function of torch.view_as_real(x) instead"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{caller}: input {k} has integer/bool dtype {x.dtype}, which has no gradient; "
                "pass a float64 (or float32) tensor, e.g. x.double()"
            )
        if x.dtype not in _SUPPORTED:
            raise TypeError(
                f"{caller}: input {k} has dtype {x.dtype}; finite differences in half precision "
                "cannot check gradients, pass x.double() (or x.float())"
            )
    check_one_device(inputs, caller)
    return tuple(same_layout(x) for x in inputs)


def check_one_device(inputs: Sequence[torch.Tensor], caller: str) -> None:
    """Every input on the same device, else a ValueError listing them."""
    devices = {x.device for x in inputs}
    if len(devices) > 1:
        listing = ", ".join(f"input {k}: {x.device}" for k, x in enumerate(inputs))
        raise ValueError(
            f"{caller}: inputs are on different devices ({listing}); move them to one device, "
            "e.g. x.to('cuda')"
        )


def same_layout(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` with the same sizes and strides (a strided slice, a transpose,
    an expanded view stay so), in fresh memory.

    The whole stretch of the caller's storage that ``x`` spans is copied, gaps included, so a
    kernel that reads memory outside ``x`` (e.g. a backward that assumes contiguity) reads what
    it would read in the caller's tensor.
    """
    x = x.detach()
    if x.is_contiguous() or x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    flat = x.as_strided((span,), (1,), x.storage_offset()).clone()
    return flat.as_strided(x.shape, x.stride(), 0)


def as_outputs(out: Any, caller: str) -> tuple[torch.Tensor, ...]:
    """Normalise ``fn``'s return value to a tuple of floating tensors, or raise TypeError."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if len(outs) == 0:
        raise TypeError(f"{caller}: fn returned an empty {type(out).__name__}; return a tensor")
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            where = "fn returned" if outs[0] is out else f"output {i} of fn is"
            raise TypeError(
                f"{caller}: {where} a {type(o).__name__}, not a tensor; fn must return a "
                "tensor or a tuple of tensors (use torch.as_tensor or return the tensor itself)"
            )
        if o.is_complex():
            raise TypeError(
                f"{caller}: output {i} of fn is complex ({o.dtype}); complex outputs are not "
                "supported, return torch.view_as_real(out) instead"
            )
        if not o.is_floating_point():
            raise TypeError(
                f"{caller}: output {i} of fn has dtype {o.dtype}, which has no gradient; return "
                "only the differentiable (floating) outputs"
            )
    return outs


def check_choice(value: Any, name: str, choices: Sequence[Any], caller: str) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{caller}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )


def check_positive(value: Any, name: str, caller: str, *, allow_zero: bool = False) -> float:
    """Raise ValueError unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{caller}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def default_step(method: str, dtype: torch.dtype) -> float:
    """Base finite-difference step for a method and input dtype (see :data:`STEP_SIZES`)."""
    return STEP_SIZES[method][dtype]


def least_precise(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype with the largest unit roundoff among floating tensors."""
    return max((t.dtype for t in tensors), key=machine_eps)


def default_tolerances(tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(atol, rtol)`` for the least precise dtype among ``tensors``."""
    dtype = least_precise(tensors)
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
