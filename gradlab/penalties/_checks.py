"""The penalties' domain checks: samples, real/fake pairs, critics, critic outputs.

Generic argument checks (numbers, choices, generators, callables) are :mod:`gradlab._validate`'s;
these helpers cover what only penalties have, in the same argument order (``fn``, the argument's
name, the value) and the same message template, built with :func:`gradlab._validate.message`:
``"{fn}: {name} must be ..., got {value!r}. {fix}"``. Each accepts the common case (one
floating tensor, ``None`` options) with a type test or two: they run on every penalty call.
"""

from __future__ import annotations

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
from gradlab._validate import check_callable, message

__all__ = [
    "METHODS",
    "as_tensors",
    "check_critic",
    "check_critic_kwargs",
    "check_nonempty",
    "check_outputs",
    "check_pair",
    "check_pair_is_simple",
    "check_requires_grad",
    "check_scaler",
    "is_ddp",
]

_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})

#: The ways :func:`~gradlab.penalties.r1_penalty` / ``r2_penalty`` can compute the penalty.
METHODS = ("exact", "finite-difference")

# BatchNorm modules already warned about (once per module object, see check_critic).
_WARNED_BATCHNORM: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_BATCHNORM = nn.modules.batchnorm._BatchNorm


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
            message(
                fn,
                arg,
                "a tensor or a non-empty tuple of tensors",
                x,
                "Pass the samples as a (B, ...) tensor, or a tuple of them for a critic with "
                "several inputs",
            )
        )
    for i, t in enumerate(tensors):
        name = arg if len(tensors) == 1 and isinstance(x, torch.Tensor) else f"{arg}[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(message(fn, name, "a tensor", t, "Pass tensors only"))
        if not t.is_floating_point():
            raise TypeError(
                message(
                    fn,
                    name,
                    "a floating-point tensor (critic inputs are differentiated)",
                    t,
                    "Pass integer inputs such as class labels through critic_kwargs instead",
                )
            )
        if t.ndim == 0:
            raise ValueError(
                message(
                    fn,
                    name,
                    "a tensor with a leading batch dimension",
                    t,
                    "Add one: x.unsqueeze(0)",
                )
            )
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                message(
                    fn,
                    name,
                    f"a tensor of {arg}[0]'s batch size {tensors[0].shape[0]}",
                    t,
                    "Every input of a sample must share the batch dimension",
                )
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
            message(
                fn,
                "fake",
                f"structured as real ({len(r)} input(s), a {type(real).__name__})",
                fake,
                "Pass both as tensors or both as tuples of the same length",
            )
        )
    for i, (a, b) in enumerate(zip(r, f)):
        where = "" if isinstance(real, torch.Tensor) else f"[{i}]"
        if a.shape != b.shape:
            raise ValueError(
                message(
                    fn,
                    f"fake{where}",
                    f"of real{where}'s shape {tuple(a.shape)}",
                    b,
                    "Both must have the same batch size and sample shape",
                )
            )
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                message(
                    fn,
                    f"fake{where}",
                    f"{a.dtype} on {a.device} like real{where}",
                    b,
                    "Convert one with .to(other)",
                )
            )
    return r, f


def check_nonempty(fn: str, arg: str, xs: tuple[torch.Tensor, ...]) -> None:
    """Refuse a batch of 0 samples: a penalty is a mean over samples (NaN for none)."""
    if xs[0].shape[0] == 0:
        raise ValueError(
            message(
                fn,
                arg,
                "a non-empty batch (a penalty is a mean over samples: none for 0 samples)",
                xs[0],
                f"Skip the penalty for this step (if {arg}.shape[0] > 0: ...), or drop the last "
                "incomplete batch (DataLoader(..., drop_last=True))",
            )
        )


def check_critic_kwargs(fn: str, critic_kwargs: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The keyword arguments for the critic (an empty mapping for ``None``)."""
    if critic_kwargs is None:
        return _NO_KWARGS
    if type(critic_kwargs) is dict or isinstance(critic_kwargs, Mapping):
        return critic_kwargs
    raise TypeError(
        message(
            fn,
            "critic_kwargs",
            "a dict of keyword arguments for the critic, or None",
            critic_kwargs,
            "Pass e.g. critic_kwargs={'labels': y}",
        )
    )


def check_scaler(fn: str, scaler: Any) -> torch.amp.GradScaler | None:
    """``None`` for no scaler or a disabled one; the scaler otherwise."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            message(
                fn,
                "scaler",
                "a torch.amp.GradScaler or None",
                scaler,
                "Pass scaler=torch.amp.GradScaler(device_type) under mixed precision, or None",
            )
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
    check_callable(
        fn,
        "critic",
        critic,
        what="a callable (an nn.Module or a function)",
        fix=f"Pass the critic module itself, e.g. {fn}(critic, ...)",
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
            message(
                fn,
                arg,
                "a tensor with one score per sample",
                outputs,
                "Return the scores as one tensor of shape (B,) or (B, ...)",
            )
        )
    if outputs.ndim == 0 or outputs.shape[0] != batch:
        raise ValueError(
            message(
                fn,
                arg,
                f"a tensor with the batch of {batch} first, shape ({batch},) or ({batch}, ...)",
                outputs,
                "Do not reduce over the batch (e.g. .mean()) inside the critic",
            )
        )
    if not outputs.is_floating_point():
        raise TypeError(
            message(fn, arg, "a floating-point tensor", outputs, "Return floating-point scores")
        )
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
                message(
                    fn,
                    name,
                    "a tensor that requires grad (the very tensor the outputs were computed from)",
                    t,
                    "Set it before the forward pass: x = x.detach().requires_grad_(True); "
                    "out = critic(x)",
                )
            )
