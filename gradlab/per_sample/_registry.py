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
            matrices, or ``m`` first and then ``dot``), or ``None`` where forming the
            per-sample gradients is cheaper (the engine then takes it from them).
        check: optional ``module -> None`` run when the context is entered; raises
            :class:`ValueError` for a configuration that makes the samples dependent.

    Example:
        The registered rule of ``nn.Linear``, called as the engine calls it, on an input ``a``
        and an output gradient ``d`` of 5 samples:

        >>> from torch import nn
        >>> from gradlab.per_sample import RULES, Rule
        >>> rule = RULES[nn.Linear]
        >>> isinstance(rule, Rule), rule.norm_sq is not None
        (True, True)
        >>> _ = torch.manual_seed(0)
        >>> layer = nn.Linear(3, 2)
        >>> a, d = torch.randn(5, 3), torch.randn(5, 2)
        >>> g = rule.grad(layer, a, d, ("weight", "bias"))
        >>> {name: tuple(t.shape) for name, t in g.items()}
        {'weight': (5, 2, 3), 'bias': (5, 2)}
        >>> torch.allclose(g["weight"][0], torch.outer(d[0], a[0]))  # sample 0: d a^T
        True
        >>> ghost = rule.norm_sq(layer, a, d, ("weight",))["weight"]  # without forming g
        >>> torch.allclose(ghost, g["weight"].square().sum((1, 2)))
        True
    """

    grad: GradFn
    norm_sq: GradFn | None = None
    dot: DotFn | None = None
    moments: Callable[..., dict[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None
    check: Callable[[nn.Module], None] | None = None
    dot_mean: Callable[..., dict[str, torch.Tensor] | None] | None = None


#: The closed-form rule of each layer type (filled by :func:`register`); a module whose type is
#: not here goes through the ``torch.func`` fallback.
RULES: dict[type[nn.Module], Rule] = {}


def register(module_type: type[nn.Module], rule: Rule) -> None:
    """Register ``rule`` for modules of exactly ``module_type`` (and subclasses that keep its
    ``forward``).

    A layer type without a rule goes through the ``torch.func`` fallback; a rule replaces it
    with a closed form (see :class:`Rule` for the functions it holds).

    Example:
        A layer ``y = x * w`` (one weight per feature), whose per-sample weight gradient is
        ``a * d``:

        >>> from torch import nn
        >>> from gradlab.per_sample import RULES, PerSampleGradients, Rule, register
        >>> class Scale(nn.Module):
        ...     def __init__(self, features):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(features))
        ...
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 1))
        >>> x = torch.randn(6, 3)
        >>> def scale_grads():
        ...     with PerSampleGradients(model, stats=("grad",)) as ps:
        ...         model(x).pow(2).mean().backward()
        ...     return ps.grad["1.weight"]
        >>> fallback = scale_grads()  # no rule for Scale yet: the torch.func fallback
        >>> register(Scale, Rule(grad=lambda module, a, d, names: {"weight": a * d}))
        >>> by_rule = scale_grads()
        >>> by_rule.shape, torch.allclose(by_rule, fallback, atol=1e-6)
        (torch.Size([6, 4]), True)
        >>> loop = [torch.autograd.grad(model(xi).pow(2).sum(), model[1].weight)[0] for xi in x]
        >>> torch.allclose(by_rule, torch.stack(loop), atol=1e-6)  # a loop over the samples
        True
        >>> del RULES[Scale]  # (only to leave the registry as it was)
    """
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
