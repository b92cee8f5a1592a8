"""Argument types and checks shared by every curvature function (one phrasing per error)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

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
                f"{fn}: the module has no parameters with requires_grad; unfreeze some or pass "
                f"tensors"
            )
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(params, torch.Tensor):
        tensors, structure = [params], "tensor"
    elif isinstance(params, Sequence) and not isinstance(params, str):
        tensors, structure = list(params), "sequence"
        if not tensors:
            raise ValueError(f"{fn}: params is empty; pass at least one tensor")
    else:
        raise TypeError(
            f"{fn}: params is a {type(params).__name__}; pass a tensor, a sequence of tensors "
            f"or an nn.Module"
        )
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: params[{i}] is a {type(t).__name__}, expected a tensor")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: params[{i}] has dtype {t.dtype}; pass floating-point tensors")
        if not t.requires_grad:
            raise ValueError(
                f"{fn}: params[{i}] (shape {tuple(t.shape)}) does not require grad; call "
                f".requires_grad_() on it"
            )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"{fn}: params mix dtypes {sorted(str(d) for d in dtypes)}; convert them to one "
            f"dtype (e.g. model.double())"
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
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{fn}: generator is a {type(generator).__name__}; pass a torch.Generator, an int "
        f"seed or None"
    )


def check_positive(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name}={value!r}; pass an int >= {minimum}")
    return value


def check_choice(fn: str, name: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(
            f"{fn}: unknown {name} {value!r}; valid {name}s are {', '.join(repr(m) for m in valid)}"
        )


def check_mode(fn: str, mode: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode={mode!r} is not one of {list(MODES)}")


def check_data(fn: str, data: Any) -> Iterable[Any] | None:
    """``data`` must be None or a re-iterable of batches (not a tensor, str or dict)."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{fn}: data is a {type(data).__name__}; pass an iterable of batches (a list such as "
            f"[(x, y)], or a DataLoader), and loss_fn(batch) is called per batch"
        )
    if iter(data) is data:
        raise TypeError(
            f"{fn}: data is an iterator ({type(data).__name__}), which can be read only once; "
            f"pass a re-iterable such as a list or a DataLoader"
        )
    return data


def check_batch_weight(fn: str, batch_weight: Any) -> BatchWeight:
    if batch_weight is not None and not callable(batch_weight):
        raise TypeError(
            f"{fn}: batch_weight is a {type(batch_weight).__name__}; pass a callable "
            f"batch_weight(batch) -> float, or None for the size of the batch's first tensor"
        )
    return batch_weight


def check_distributed(fn: str, distributed: Any) -> None:
    if not isinstance(distributed, bool):
        raise TypeError(f"{fn}: distributed is a {type(distributed).__name__}; pass True or False")


def _positional(fn: Callable[..., Any]) -> tuple[int, int] | None:
    """(required, accepted) positional arguments of ``fn``; None where its signature is unknown."""
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
