"""Shared pieces of gradlab.testing: argument checks, step sizes and tolerances per dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import gradlab._validate as v

__all__ = [
    "DEFAULT_TOLERANCES",
    "METHODS",
    "NOISE_FACTOR",
    "STEP_SIZES",
    "as_outputs",
    "check_fn",
    "check_inputs",
    "default_step",
    "default_tolerances",
    "least_precise",
    "machine_eps",
    "raw_outputs",
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
    v.check_callable(
        caller,
        "fn",
        fn,
        what="a callable taking the input tensors",
        fix=f"Pass the function first, then the tensors: {caller}(fn, x, ...)",
    )


def check_inputs(inputs: Sequence[Any], caller: str) -> tuple[torch.Tensor, ...]:
    """Validate the positional inputs and return detached copies (never the caller's tensors)."""
    if len(inputs) == 0:
        raise TypeError(
            v.message(caller, "inputs", "one or more tensors", inputs, f"Call {caller}(fn, x, ...)")
        )
    for k, x in enumerate(inputs):
        name = f"inputs[{k}]"
        v.check_type(
            caller,
            name,
            x,
            torch.Tensor,
            what="a torch.Tensor",
            fix="Every positional argument after fn is differentiated: bind non-tensor arguments "
            "with functools.partial or a lambda",
        )
        if x.layout != torch.strided:
            raise TypeError(
                v.message(
                    caller, name, "a dense (strided) tensor", x, "Convert it with .to_dense()"
                )
            )
        if x.is_complex():
            raise TypeError(
                v.message(
                    caller,
                    name,
                    "a real floating tensor (complex inputs are not supported here)",
                    x,
                    "Pass the real function of torch.view_as_real(x) instead",
                )
            )
        if not x.is_floating_point():
            raise TypeError(
                v.message(
                    caller,
                    name,
                    "a floating tensor (integer/bool tensors have no gradient)",
                    x,
                    "Pass a float64 (or float32) tensor, e.g. x.double()",
                )
            )
        if x.dtype not in _SUPPORTED:
            raise TypeError(
                v.message(
                    caller,
                    name,
                    "float32 or float64 (finite differences in half precision cannot check "
                    "gradients)",
                    x,
                    "Pass x.double() (or x.float())",
                )
            )
    check_one_device(inputs, caller)
    return tuple(same_layout(x) for x in inputs)


def check_one_device(inputs: Sequence[torch.Tensor], caller: str) -> None:
    """Every input on the same device, else a ValueError listing them."""
    devices = {x.device for x in inputs}
    if len(devices) > 1:
        listing = ", ".join(f"input {k}: {x.device}" for k, x in enumerate(inputs))
        raise ValueError(
            f"{caller}: inputs must be on one device, got {listing}. Move them to one device, "
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


def raw_outputs(out: Any, caller: str) -> tuple[torch.Tensor, ...]:
    """``fn``'s return value as a non-empty tuple of tensors (any dtype), or raise TypeError."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if len(outs) == 0:
        raise TypeError(
            v.message(
                caller,
                "fn's return value",
                "a tensor or a non-empty tuple of tensors",
                out,
                "Return a tensor",
            )
        )
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            raise TypeError(
                v.message(
                    caller,
                    "fn's return value" if outs[0] is out else f"output {i} of fn",
                    "a tensor or a tuple of tensors",
                    o,
                    "Return the tensor itself (or torch.as_tensor(...))",
                )
            )
    return outs


def as_outputs(out: Any, caller: str) -> tuple[torch.Tensor, ...]:
    """Normalise ``fn``'s return value to a tuple of floating tensors, or raise TypeError."""
    outs = raw_outputs(out, caller)
    for i, o in enumerate(outs):
        if o.is_complex():
            raise TypeError(
                v.message(
                    caller,
                    f"output {i} of fn",
                    "real (complex outputs are not supported here)",
                    o,
                    "Return torch.view_as_real(out) instead",
                )
            )
        if not o.is_floating_point():
            raise TypeError(
                v.message(
                    caller,
                    f"output {i} of fn",
                    "a floating tensor (integer/bool outputs have no gradient)",
                    o,
                    "Return only the differentiable (floating) outputs",
                )
            )
    return outs


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
