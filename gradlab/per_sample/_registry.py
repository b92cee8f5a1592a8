"""The registry of per-layer rules: ``{module type: Rule}``, and :func:`register` to add one.

A *rule* computes a layer's per-sample quantities in closed form from what the engine captures
for one call of the layer: its input ``a`` (the first positional argument, detached) and the
gradient ``d`` of the loss w.r.t. its output. Every function of a rule receives
``(module, a, d, names)``, ``names`` the layer's own parameter names that are wanted (trainable),
and returns a dict keyed by those names. Results are of the gradient of the loss as it was
(the engine rescales them to per-sample gradients ``g_i``: times ``B`` for a mean loss, over the
loss scale under AMP). A layer type without a rule goes through the ``torch.func`` fallback
(:mod:`gradlab.per_sample._fallback`).

Adding a layer type is one file with its functions and one :func:`register` call, imported by
``gradlab/per_sample/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RULES", "Rule", "register", "rule_for"]

Names = tuple[str, ...]
GradFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Names], dict[str, torch.Tensor]]
DotFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """How to compute one layer type's per-sample quantities from its input and output gradient.

    Attributes:
        grad: ``(module, a, d, names) -> {name: (B, *p.shape)}``, the per-sample gradients
            (required: every other quantity can be derived from it).
        norm_sq: optional ``-> {name: (B,)}``, squared per-sample norms without materialising
            the per-sample gradients where cheaper (ghost norms).
        dot: optional ``(module, a, d, v) -> (B,)``, ``sum over names of g_i . v[name]`` without
            materialising; ``v`` holds one tensor per wanted name, of the parameter's shape.
        moments: optional ``(module, a, d, names, with_sum) -> {name: (sum_i g_i, sum_i
            g_i**2)}`` without materialising (the sum may be ``None`` unless ``with_sum``), or
            ``None`` where that is not cheaper (sequences).
        dot_mean: optional ``(module, a, d, names) -> {name: (B,)}``, ``g_i . m`` per
            parameter with ``m = (1/B) sum_k g_k`` the batch mean, without materialising (Gram
            matrices, or ``m`` first and then :attr:`dot`), or ``None`` where forming the
            per-sample gradients is cheaper (the engine then takes it from them).
        check: optional ``module -> None`` run when the context is entered; raises
            :class:`ValueError` for a configuration that makes the samples dependent.
    """

    grad: GradFn
    norm_sq: GradFn | None = None
    dot: DotFn | None = None
    moments: Callable[..., dict[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None
    check: Callable[[nn.Module], None] | None = None
    dot_mean: Callable[..., dict[str, torch.Tensor] | None] | None = None


RULES: dict[type[nn.Module], Rule] = {}


def register(module_type: type[nn.Module], rule: Rule) -> None:
    """Register ``rule`` for modules of exactly ``module_type`` (and subclasses that keep its
    ``forward``)."""
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of ``module``'s type, or of a registered base class whose ``forward`` it keeps
    (``nn.MultiheadAttention``'s ``out_proj`` is a ``Linear`` subclass); ``None``: fallback."""
    cls = type(module)
    if cls in RULES:
        return RULES[cls]
    for base in cls.__mro__[1:]:
        if base in RULES and cls.forward is base.forward:
            return RULES[base]
    return None
