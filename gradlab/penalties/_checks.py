"""Validation shared by every penalty: one ``_check_*`` helper per concern (STYLE.md #7).

Every helper takes the public function's name as ``fn`` so that its message names the function the
user called, the argument, what was received and the fix.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from gradlab._errors import GraphError
from gradlab._typing import TensorOrTensors

__all__ = [
    "METHODS",
    "as_tensors",
    "check_critic",
    "check_critic_kwargs",
    "check_generator",
    "check_method",
    "check_nonempty",
    "check_nonnegative",
    "check_outputs",
    "check_pair",
    "check_pair_is_simple",
    "check_positive",
    "check_requires_grad",
    "check_scaler",
    "is_ddp",
]

_INF = math.inf
_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})

#: The ways :func:`~gradlab.penalties.r1_penalty` / ``r2_penalty`` can compute the penalty.
METHODS = ("exact", "finite-difference")

# BatchNorm modules already warned about (once per module object, see check_critic).
_WARNED_BATCHNORM: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_BATCHNORM = nn.modules.batchnorm._BatchNorm


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:120]


def as_tensors(fn: str, arg: str, x: TensorOrTensors) -> tuple[torch.Tensor, ...]:
    """``x`` as a non-empty tuple of floating-point tensors with one shared batch size."""
    if type(x) is torch.Tensor and x.ndim > 0 and x.is_floating_point():  # the common case
        return (x,)
    if isinstance(x, torch.Tensor):
        tensors: tuple[torch.Tensor, ...] = (x,)
    elif isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0:
        tensors = tuple(x)
    else:
        raise TypeError(
            f"{fn}: {arg} must be a tensor or a non-empty tuple of tensors, got {_describe(x)}"
        )
    for i, t in enumerate(tensors):
        name = arg if len(tensors) == 1 and isinstance(x, torch.Tensor) else f"{arg}[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}; critic inputs must be floating point. Pass "
                "integer inputs such as class labels through critic_kwargs instead"
            )
        if t.ndim == 0:
            raise ValueError(
                f"{fn}: {name} is a 0-d tensor; inputs need a leading batch dimension, e.g. "
                "x.unsqueeze(0)"
            )
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"{fn}: {name} has batch size {t.shape[0]} but {arg}[0] has "
                f"{tensors[0].shape[0]}; every input of a sample must share the batch dimension"
            )
    return tensors


def check_pair_is_simple(real: Any, fake: Any) -> bool:
    """Whether ``real`` and ``fake`` are single tensors that pass every check of check_pair."""
    return (
        isinstance(real, torch.Tensor)
        and isinstance(fake, torch.Tensor)
        and real.shape == fake.shape
        and real.ndim > 0
        and real.dtype == fake.dtype
        and real.is_floating_point()
        and (fake is real or real.device == fake.device)
    )


def check_pair(
    fn: str, real: TensorOrTensors, fake: TensorOrTensors
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``real`` and ``fake`` as tuples with the same structure, shapes, dtypes and devices."""
    if check_pair_is_simple(real, fake):  # the common case: the checks below would all pass
        return (real,), (fake,)  # type: ignore[return-value]
    r = as_tensors(fn, "real", real)
    f = as_tensors(fn, "fake", fake)
    if isinstance(real, torch.Tensor) != isinstance(fake, torch.Tensor) or len(r) != len(f):
        raise ValueError(
            f"{fn}: real has {len(r)} input(s) ({type(real).__name__}) but fake has {len(f)} "
            f"({type(fake).__name__}); pass both as tensors or both as tuples of the same length"
        )
    for i, (a, b) in enumerate(zip(r, f)):
        where = "" if isinstance(real, torch.Tensor) else f"[{i}]"
        if a.shape != b.shape:
            raise ValueError(
                f"{fn}: real{where} has shape {tuple(a.shape)} but fake{where} has "
                f"{tuple(b.shape)}; both must match (same batch size and sample shape)"
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"{fn}: real{where} is {a.dtype} on {a.device} but fake{where} is {b.dtype} on "
                f"{b.device}; convert one with .to(other)"
            )
    return r, f


def check_nonnegative(fn: str, arg: str, value: float) -> float:
    """A finite number >= 0 (weights, gamma, center, noise scale, decay), as a float.

    The common case (a float in range) is accepted with one type test and one comparison: this
    runs on every penalty call.
    """
    if type(value) is float and 0.0 <= value < _INF:
        return value
    return _number(fn, arg, value, ">= 0", allow_zero=True)


def check_positive(fn: str, arg: str, value: float) -> float:
    """A finite number > 0 (the finite-difference step), as a float."""
    if type(value) is float and 0.0 < value < _INF:
        return value
    return _number(fn, arg, value, "> 0", allow_zero=False)


def _number(fn: str, arg: str, value: Any, bound: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{fn}: {arg} must be a float, got {value!r} ({type(value).__name__}). "
            f"Pass a finite number {bound}"
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{fn}: {arg} must be a finite number {bound}, got {value!r}. Pass a finite "
            f"number {bound}"
        )
    return float(value)


def check_method(fn: str, method: Any) -> str:
    """One of :data:`METHODS`."""
    if method == "exact" or method == "finite-difference":
        return str(method)
    raise ValueError(
        f"{fn}: method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}. "
        "Pass method='exact' (double backward) or method='finite-difference' (no double "
        "backward)"
    )


def check_generator(fn: str, generator: Any) -> torch.Generator | None:
    """A :class:`torch.Generator`, ``None``, or an int seed (a new CPU generator seeded with it,
    as in :mod:`gradlab.curvature`)."""
    if generator is None or type(generator) is torch.Generator:
        return generator
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{fn}: generator must be a torch.Generator, an int seed or None, got {generator!r} "
        f"({type(generator).__name__}). Pass e.g. generator=torch.Generator().manual_seed(0) "
        "or generator=0"
    )


def check_nonempty(fn: str, arg: str, xs: tuple[torch.Tensor, ...]) -> None:
    """Refuse a batch of 0 samples: a penalty is a mean over samples (NaN for none)."""
    if xs[0].shape[0] == 0:
        raise ValueError(
            f"{fn}: {arg} is an empty batch (shape {tuple(xs[0].shape)}); the penalty is a mean "
            "over samples and has no value for 0 samples. Fix: skip the penalty for this step "
            f"(if {arg}.shape[0] > 0: ...), or drop the last incomplete batch "
            "(DataLoader(..., drop_last=True))"
        )


def check_critic_kwargs(fn: str, critic_kwargs: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The keyword arguments for the critic (an empty mapping for ``None``)."""
    if critic_kwargs is None:
        return _NO_KWARGS
    if type(critic_kwargs) is dict or isinstance(critic_kwargs, Mapping):
        return critic_kwargs
    raise TypeError(
        f"{fn}: critic_kwargs must be a dict of keyword arguments for the critic, got "
        f"{_describe(critic_kwargs)}. Pass e.g. critic_kwargs={{'labels': y}}, or None"
    )


def check_scaler(fn: str, scaler: Any) -> torch.amp.GradScaler | None:
    """``None`` for no scaler or a disabled one; the scaler otherwise."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"{fn}: scaler must be a torch.amp.GradScaler or None, got {_describe(scaler)}. "
            "Pass scaler=torch.amp.GradScaler(device_type) under mixed precision, or None"
        )
    return scaler if scaler.is_enabled() else None


def is_ddp(module: Any) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _is_compiled(obj: Any) -> bool:
    # torch.compile imports torch._dynamo; if that never happened nothing can be compiled, and we
    # avoid importing dynamo (about a second) ourselves.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(obj, eval_frame.OptimizedModule):
        return True
    if isinstance(obj, nn.Module):
        return obj.__dict__.get("_compiled_call_impl") is not None  # nn.Module.compile()
    return hasattr(obj, "_torchdynamo_orig_callable")  # torch.compile(function)


def _compiled_error(fn: str, where: str) -> GraphError:
    return GraphError(
        f"{fn}: {where} is compiled with torch.compile; a gradient penalty differentiates the "
        "critic twice and torch.compile (aot_autograd) does not support double backward. Fix: "
        "pass the uncompiled critic (for a module compiled with torch.compile(m), that is "
        "m._orig_mod); you can still compile the generator and the rest of the training step"
    )


_FSDP_TYPES: tuple[type, ...] = ()
_COMPILED_TYPES: tuple[type, ...] = ()


def _fsdp_types() -> tuple[type, ...]:
    """FSDP 1 (``FullyShardedDataParallel``) and FSDP2 (``FSDPModule``, the class
    ``fully_shard`` gives a module) once ``torch.distributed.fsdp`` is loaded; nothing can be
    wrapped with FSDP before that, and we avoid importing it ourselves. Found once, then kept
    (a module-level tuple: a race between threads finds the same classes)."""
    global _FSDP_TYPES
    if not _FSDP_TYPES:
        mod = sys.modules.get("torch.distributed.fsdp")
        if mod is not None:
            names = ("FullyShardedDataParallel", "FSDPModule")
            found = (getattr(mod, n, None) for n in names)
            _FSDP_TYPES = tuple(t for t in found if isinstance(t, type))
    return _FSDP_TYPES


def _compiled_types() -> tuple[type, ...]:
    """``OptimizedModule`` once ``torch._dynamo`` is loaded (found once, then kept)."""
    global _COMPILED_TYPES
    if not _COMPILED_TYPES:
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None:
            _COMPILED_TYPES = (eval_frame.OptimizedModule,)
    return _COMPILED_TYPES


def _fsdp_error(fn: str, where: str, module: nn.Module, finite_difference: bool) -> GraphError:
    kind = (
        "FullyShardedDataParallel (FSDP 1)"
        if type(module).__name__ == "FullyShardedDataParallel"
        else "fully_shard (FSDP2)"
    )
    if finite_difference:
        fix = (
            f"use {fn}(..., method='finite-difference'), which needs only a first-order "
            "backward and runs through FSDP, or wrap the critic with DistributedDataParallel "
            "instead of FSDP (a critic usually fits on one device)"
        )
    else:
        fix = (
            "wrap the critic with DistributedDataParallel instead of FSDP (a critic usually "
            "fits on one device), or use a zero-centred penalty with a first-order estimator: "
            "r1_penalty(..., method='finite-difference')"
        )
    return GraphError(
        f"{fn}: {where} is wrapped with {kind}. An exact gradient penalty differentiates the "
        "critic twice and FSDP does not support double backward: the parameter gradients come "
        "out silently wrong (FSDP 1) or backward fails (full sharding, FSDP2). Fix: " + fix
    )


def check_critic(
    fn: str, critic: Any, *, exact: bool = True, finite_difference: bool = False
) -> None:
    """Refuse what cannot be differentiated twice (``exact``: compiled critics, FSDP critics)
    and static-graph DDP; warn once per BatchNorm in training mode. ``finite_difference``: the
    penalty ``fn`` offers ``method="finite-difference"`` (the FSDP error then suggests it)."""
    if not callable(critic):
        raise TypeError(
            f"{fn}: critic must be a callable (an nn.Module or a function), got "
            f"{_describe(critic)}. Pass the critic module itself, e.g. {fn}(critic, ...)"
        )
    if exact and _is_compiled(critic):
        raise _compiled_error(fn, "critic")
    if not isinstance(critic, nn.Module):
        return
    if is_ddp(critic) and getattr(critic, "static_graph", False):
        raise ValueError(
            f"{fn}: critic is a DistributedDataParallel with static_graph=True. A penalty-only "
            "backward touches a different set of parameters than an adversarial one, and with a "
            "static graph DDP then silently skips the all-reduce, so ranks drift apart. Fix: "
            "wrap the critic with static_graph=False (the default); gradlab adds a zero-weighted "
            "term over the critic's outputs so that every parameter takes part in every backward"
        )
    fsdp = _fsdp_types() if exact else ()
    if fsdp and isinstance(critic, fsdp):
        raise _fsdp_error(fn, "critic", critic, finite_difference)
    refused = fsdp + _compiled_types() if exact else ()
    if _needs_full_scan(critic, refused, exact):
        _scan_modules(fn, critic, fsdp, exact, finite_difference)


def _needs_full_scan(critic: nn.Module, refused: tuple[type, ...], exact: bool) -> bool:
    """Whether the critic has a submodule to warn about or refuse (a BatchNorm in training mode
    not warned about yet; if ``exact``, a submodule of a ``refused`` type or compiled in
    place).

    A plain walk over ``_modules``, several times cheaper than ``critic.modules()``: it runs on
    every call of every penalty, so at small critics it is a visible part of the step.
    :func:`_scan_modules` then reports, in ``critic.modules()`` order.
    """
    stack = [critic]
    seen = set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, _BATCHNORM):
            if m.training and m not in _WARNED_BATCHNORM:
                return True
        elif exact and m is not critic:
            if isinstance(m, refused) or m.__dict__.get("_compiled_call_impl") is not None:
                return True
        children = m._modules
        if children:
            stack.extend(c for c in children.values() if c is not None)
    return False


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel, for its caller, of the first frame outside
    gradlab.penalties (the user's call, whichever penalty and however deep)."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "gradlab.penalties"
    ):
        frame, level = frame.f_back, level + 1
    return level


def _scan_modules(
    fn: str, critic: nn.Module, fsdp: tuple[type, ...], exact: bool, finite_difference: bool
) -> None:
    """Warn about BatchNorms in training mode; if ``exact``, refuse compiled and FSDP
    submodules (critic.modules() order)."""
    for m in critic.modules():
        if isinstance(m, _BATCHNORM):
            if m.training and m not in _WARNED_BATCHNORM:
                _WARNED_BATCHNORM.add(m)
                name = next(n for n, s in critic.named_modules() if s is m) or "<critic itself>"
                warnings.warn(
                    f"{fn}: the critic's module {name!r} ({type(m).__name__}) is in training "
                    "mode; batch normalization couples the samples of a batch, so the per-sample "
                    "input gradients the penalty constrains are not per-sample any more. The "
                    "WGAN-GP paper (Gulrajani et al. 2017) uses layer normalization in the "
                    "critic: use nn.LayerNorm/nn.GroupNorm/no normalization, or call .eval() on "
                    "the module. (Shown once per module.)",
                    UserWarning,
                    stacklevel=_user_stacklevel(),
                )
        elif exact and m is not critic and (_is_compiled(m) or (fsdp and isinstance(m, fsdp))):
            name = next(n for n, s in critic.named_modules() if s is m)
            where = f"the critic's submodule {name!r}"
            if fsdp and isinstance(m, fsdp):
                raise _fsdp_error(fn, where, m, finite_difference)
            raise _compiled_error(fn, where)


def check_outputs(fn: str, outputs: Any, batch: int, arg: str = "the critic's output") -> None:
    """Outputs must be a floating tensor whose first dimension is the batch."""
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"{fn}: {arg} must be a tensor with one score per sample, got {_describe(outputs)}"
        )
    if outputs.ndim == 0 or outputs.shape[0] != batch:
        raise ValueError(
            f"{fn}: {arg} has shape {tuple(outputs.shape)} but the batch has {batch} samples; "
            f"it must keep the batch dimension, shape ({batch},) or ({batch}, ...). Do not "
            "reduce over the batch (e.g. .mean()) inside the critic"
        )
    if not outputs.is_floating_point():
        raise TypeError(f"{fn}: {arg} has dtype {outputs.dtype}; it must be floating point")
    if outputs.grad_fn is None and not outputs.requires_grad:
        raise GraphError(
            f"{fn}: {arg} does not require grad, so it has no gradient with respect to the "
            "inputs. Fix: compute it with gradients enabled (not under torch.no_grad()) from "
            "inputs that require grad, and do not detach it"
        )


def check_requires_grad(fn: str, arg: str, inputs: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            name = arg if len(inputs) == 1 else f"{arg}[{i}]"
            raise ValueError(
                f"{fn}: {name} does not require grad; the inputs must be the very tensors the "
                "outputs were computed from, with requires_grad=True set "
                "before the forward pass (x = x.detach().requires_grad_(True); out = critic(x))"
            )
