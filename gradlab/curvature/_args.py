"""Argument types and the curvature-specific checks (generic ones: :mod:`gradlab._validate`)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

import gradlab._validate as v

ParamsArg: TypeAlias = torch.Tensor | Sequence[torch.Tensor] | nn.Module
GeneratorArg: TypeAlias = torch.Generator | int | None
ProgressArg: TypeAlias = bool | Callable[[int, int], object]
BatchWeight: TypeAlias = Callable[[Any], float] | None
MODES = ("eval", "train", None)


def check_params(fn: str, params: ParamsArg) -> tuple[list[torch.Tensor], Any]:
    """The list of tensors, and how to give per-parameter results back (``structure``).

    ``structure`` is ``"tensor"``, ``"sequence"`` or the list of parameter names (a module).
    """
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{fn}: params must be a module with parameters that require grad, got a "
                f"{type(params).__name__} with none. Unfreeze some (gl.unfreeze) or pass tensors"
            )
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(params, torch.Tensor):
        tensors, structure = [params], "tensor"
    elif isinstance(params, Sequence) and not isinstance(params, str):
        tensors, structure = list(params), "sequence"
        if not tensors:
            raise ValueError(
                v.message(fn, "params", "non-empty", params, "Pass at least one tensor")
            )
    else:
        raise TypeError(
            v.message(
                fn,
                "params",
                "a tensor, a sequence of tensors or an nn.Module",
                params,
                "Pass e.g. model or list(model.parameters())",
            )
        )
    for i, t in enumerate(tensors):
        name = "params" if structure == "tensor" else f"params[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(v.message(fn, name, "a tensor", t, "Pass tensors or a module"))
        if not t.is_floating_point():
            raise TypeError(
                v.message(fn, name, "a floating-point tensor", t, "Convert it, e.g. t.double()")
            )
        if not t.requires_grad:
            raise ValueError(
                v.message(
                    fn, name, "a tensor that requires grad", t, "Call .requires_grad_() on it"
                )
            )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"{fn}: params must be tensors of one dtype, got dtypes "
            f"{sorted(str(d) for d in dtypes)}. Convert them to one dtype (e.g. model.double())"
        )
    return tensors, structure


def param_names(params: ParamsArg, count: int) -> list[str]:
    """Names for error messages: parameter names for a module, ``params[i]`` otherwise."""
    if isinstance(params, nn.Module):
        return [n for n, p in params.named_parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        return ["params"]
    return [f"params[{i}]" for i in range(count)]


def check_generator(fn: str, generator: GeneratorArg) -> torch.Generator | None:
    return v.check_generator(fn, "generator", generator)


def check_positive(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    return v.check_int(fn, name, value, minimum=minimum)


def check_choice(fn: str, name: str, value: Any, valid: Sequence[Any]) -> None:
    v.check_choice(fn, name, value, valid)


def check_mode(fn: str, mode: Any) -> None:
    v.check_choice(fn, "mode", mode, MODES)


def check_data(fn: str, data: Any) -> Iterable[Any] | None:
    """``data`` must be None or a re-iterable of batches (not a tensor, str or dict)."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            v.message(
                fn,
                "data",
                "an iterable of batches",
                data,
                "Pass a list such as [(x, y)] or a DataLoader; loss_fn(batch) is called per batch",
            )
        )
    if iter(data) is data:
        raise TypeError(
            f"{fn}: data must be a re-iterable (read once per pass), got an iterator "
            f"({type(data).__name__}). Pass a list or a DataLoader"
        )
    return data


def check_batch_weight(fn: str, batch_weight: Any) -> BatchWeight:
    if batch_weight is None:
        return None
    return v.check_callable(
        fn,
        "batch_weight",
        batch_weight,
        what="a callable batch_weight(batch) -> float or None",
        fix="Pass None for the size of the batch's first tensor",
    )


def check_distributed(fn: str, distributed: Any) -> None:
    v.check_bool(fn, "distributed", distributed)


def _positional(fn: Callable[..., Any]) -> tuple[int, int] | None:
    """(required, accepted) positional arguments of ``fn``; None where its signature is unknown."""
    if type(fn) is types.FunctionType and not hasattr(fn, "__wrapped__"):
        # a plain function or lambda (the usual closure): read its code object, as
        # inspect.signature would, without building a Signature (tens of microseconds a call)
        code, defaults = fn.__code__, fn.__defaults__ or ()
        required = code.co_argcount - len(defaults)
        if code.co_flags & inspect.CO_VARARGS:
            return required, 1 << 30
        kwonly = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
        if any(name not in (fn.__kwdefaults__ or {}) for name in kwonly):
            return None
        return required, code.co_argcount
    try:
        sig = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn)
    except (TypeError, ValueError):
        return None
    required = accepted = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return required, 1 << 30
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            accepted += 1
            required += p.default is p.empty
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return required, accepted


def check_loss_closure(fn: str, loss_fn: Any, data: Any) -> None:
    """``loss_fn()`` without ``data=``, ``loss_fn(batch)`` with it; a model is refused."""
    if not callable(loss_fn):
        raise TypeError(
            f"{fn}: loss_fn must be a callable returning the scalar loss, got "
            f"{type(loss_fn).__name__}. Pass e.g. lambda: criterion(model(x), y)"
        )
    arity = _positional(loss_fn)
    what = (
        f"a {type(loss_fn).__name__} (an nn.Module)"
        if isinstance(loss_fn, nn.Module)
        else f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)!r}"
    )
    if data is None and arity is not None and arity[0] > 0:
        raise TypeError(
            f"{fn}: loss_fn must be callable with no arguments, got {what}, which needs "
            f"{arity[0]}. Pass a closure returning the scalar loss, e.g. "
            f"lambda: criterion(model(x), y), or pass data= to have loss_fn(batch) called per batch"
        )
    if data is not None and arity is not None and arity[1] == 0:
        raise TypeError(
            f"{fn}: with data=, loss_fn must take one argument (the batch), got {what}, which "
            f"takes none. Write it as lambda batch: criterion(model(batch[0]), batch[1]), or "
            f"drop data="
        )
