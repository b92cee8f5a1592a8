"""Wrapped models: DistributedDataParallel, FSDP, torch.compile, gradient checkpointing.

Freezing changes which parameters require gradients and which BatchNorm layers run in eval mode.
Three kinds of wrapper capture that state when they are built, so changing it afterwards goes
wrong in ways that are hard to trace; gradlab warns (``UserWarning``) when it detects them:

- **DistributedDataParallel / FSDP** record the parameters that require gradients when they are
  constructed. Freezing after wrapping makes the next backward fail (the reducer waits for
  gradients that never come); unfreezing after wrapping silently lets the ranks diverge (the newly
  trainable parameters are never all-reduced). Freeze before wrapping, or wrap again.
- **torch.compile** guards on ``requires_grad`` and ``training``: every change recompiles on the
  next call, and toggling each step (the GAN pattern with :func:`frozen`) soon hits the recompile
  limit and falls back to eager. Freeze before compiling (detected without compiling anything:
  the ``OptimizedModule`` wrapper is recognised by type).
- **Reentrant gradient checkpointing** (``torch.utils.checkpoint(..., use_reentrant=True)``, the
  old default, and Hugging Face's ``gradient_checkpointing_enable()`` unless told otherwise) only
  back-propagates into a checkpointed segment when one of its *inputs* requires grad. Freezing the
  layers before a segment (typically the embeddings) makes its inputs constant, and the trainable
  parameters inside get no gradient at all, silently. Use ``use_reentrant=False`` (or, with
  Hugging Face, ``model.enable_input_require_grads()``). Detected where the model says so
  (Hugging Face's ``gradient_checkpointing`` attributes); a bare ``checkpoint`` call inside a
  ``forward`` cannot be seen from outside.

The DDP / FSDP and compile wrappers are unwrapped before matching, so names are those of the
wrapped network (``"layer1"``, not ``"module.layer1"`` or ``"_orig_mod.layer1"``).
"""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["unwrap", "warn_checkpointing", "warn_wrapped"]


def _type_names(obj: object) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _is_distributed(model: nn.Module) -> str | None:
    names = _type_names(model)
    for name in ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule"):
        if name in names:
            return name
    return None


def _is_compiled(model: nn.Module) -> bool:
    return "OptimizedModule" in _type_names(model) and hasattr(model, "_orig_mod")


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The network inside DDP / FSDP / compile wrappers, and the wrapper names peeled off."""
    wrappers: list[str] = []
    while True:
        if _is_compiled(model):
            wrappers.append("torch.compile")
            model = model._orig_mod  # type: ignore[assignment]
        elif (name := _is_distributed(model)) is not None and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            wrappers.append(name)
            model = model.module  # type: ignore[assignment]
        elif (name := _is_distributed(model)) is not None:
            wrappers.append(name)  # FSDP2 (fully_shard) modifies the module in place
            return model, wrappers
        else:
            return model, wrappers


def warn_wrapped(wrappers: list[str], fn: str) -> None:
    """Warn once per call when what is frozen changed on a wrapped model."""
    for wrapper in wrappers:
        if wrapper == "torch.compile":
            message = (
                f"{fn}: model is compiled with torch.compile; changing requires_grad or "
                "BatchNorm modes recompiles on the next call, and changing them every step hits "
                "the recompile limit (then runs eagerly). Freeze before torch.compile"
            )
        else:
            message = (
                f"{fn}: model is wrapped in {wrapper}, which records the trainable parameters "
                "when it is built: freezing now makes the next backward fail, unfreezing lets "
                "ranks diverge silently. Freeze before wrapping (or wrap the model again)"
            )
        warnings.warn(message, UserWarning, stacklevel=3)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant", True):
            return True
    return False


def warn_checkpointing(model: nn.Module, fn: str) -> None:
    """Warn when part of a model with reentrant gradient checkpointing is frozen."""
    params = list(model.parameters())
    if not any(p.requires_grad for p in params) or all(p.requires_grad for p in params):
        return
    if _reentrant_checkpointing(model):
        warnings.warn(
            f"{fn}: model uses gradient checkpointing with use_reentrant=True; a checkpointed "
            "segment whose inputs come only from frozen layers gets no gradients for its "
            "trainable parameters (silently). Use use_reentrant=False, e.g. "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
            "False}), or make the inputs require grad (model.enable_input_require_grads())",
            UserWarning,
            stacklevel=3,
        )
