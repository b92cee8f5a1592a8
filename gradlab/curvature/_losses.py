r"""Losses with a known Hessian w.r.t. the model output: one registered rule per loss.

A loss :math:`L = c \sum_n \ell(f_n, y_n)` (``c`` = 1 for ``reduction="sum"``, 1 over the number
of terms for ``"mean"``) is described by its per-term pieces, all taken w.r.t. the output ``f``:

- ``hessian(f, y)``: a function :math:`U \mapsto \nabla^2_f \ell\, U` for ``U`` with a leading
  dimension of k vectors (sum over samples, no ``c``), what it needs of ``f`` computed once;
- ``sqrt(f, y)``: factors :math:`S` of shape ``(m, *f.shape)`` with
  :math:`\nabla^2_f \ell = \sum_j s_j s_j^\top` per sample (for the exact GGN diagonal);
- ``grad(f, y)``: :math:`\nabla_f \ell(f, y)` (for the empirical Fisher);
- ``sample(f, generator)``: a label :math:`\hat y \sim p(y \mid f)`, the likelihood whose
  negative log is :math:`\ell` (so :math:`\mathbb E[\nabla\ell\nabla\ell^\top] = \nabla^2_f\ell`,
  and the Monte-Carlo Fisher is unbiased for the GGN);
- ``terms(f)``: the number of terms a ``"mean"`` reduction divides by.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LOSSES", "LossRule", "loss_rule"]


class LossRule(NamedTuple):
    name: str
    hessian: Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
    sqrt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    terms: Callable[[torch.Tensor], int]


def _ce_hessian(f: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    p = f.softmax(1)

    def apply(U: torch.Tensor) -> torch.Tensor:  # (diag p - p p^T) u per sample and position
        pu = p * U
        return pu.sub_(p * pu.sum(2, keepdim=True))

    return apply


def _bce_hessian(f: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    s = torch.sigmoid(f)
    d = s * (1 - s)
    return lambda U: d * U


def ce_root(p: torch.Tensor) -> torch.Tensor:
    r"""C - 1 factors :math:`s_j` (shape ``(C - 1, *p.shape)``) of the cross-entropy Hessian
    :math:`\operatorname{diag} p - p p^\top = \sum_j s_j s_j^\top` for probabilities ``p``
    over dimension 1: as many as its rank (C would do, with one more column to propagate).

    With :math:`u = \sqrt p` (a unit vector), the Hessian is :math:`D (I - u u^\top) D`,
    :math:`D = \operatorname{diag} u`, and :math:`I - u u^\top = Q Q^\top` for the first C - 1
    columns :math:`Q = I_{:, :C-1} - v v_{:C-1}^\top / (1 + u_C)` of the Householder reflection
    :math:`I - v v^\top / (1 + u_C)`, :math:`v = u + e_C`, which maps :math:`e_C` to :math:`-u`
    (stable: :math:`1 + u_C \ge 1`). So :math:`s_j = D q_j`.
    """
    u = p.sqrt()
    C = p.shape[1]
    if C == 1:  # one class: p = 1, zero Hessian
        return torch.zeros_like(p).unsqueeze(0)
    v = u.clone()
    v.narrow(1, C - 1, 1).add_(1)
    # s_j = u * (e_j - v v_j / (1 + u_C)), j < C - 1, as (C - 1, *p.shape)
    vj = v.narrow(1, 0, C - 1).movedim(1, 0).unsqueeze(2)  # (C - 1, N, 1, ...)
    w = (u * v / v.narrow(1, C - 1, 1)).unsqueeze(0)  # u v / (1 + u_C), (1, N, C, ...)
    S = -vj * w
    eye = torch.eye(C, dtype=p.dtype, device=p.device)[: C - 1]
    S += eye.reshape([C - 1, 1, C] + [1] * (p.dim() - 2)) * u.unsqueeze(0)
    return S


def _ce_sqrt(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce_root(f.softmax(1))


def _onehot(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Class indices ``y`` as one-hot vectors along ``f``'s class dimension 1."""
    return torch.zeros_like(f).scatter_(1, y.unsqueeze(1), 1.0)


def _ce_sample(f: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    p = f.softmax(1).movedim(1, -1).reshape(-1, f.shape[1])
    y = torch.multinomial(p, 1, generator=gen).reshape(f.movedim(1, -1).shape[:-1])
    return y


def _mse_sqrt(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = f[0].numel()
    eye = torch.eye(d, dtype=f.dtype, device=f.device) * math.sqrt(2.0)
    return eye.reshape(d, 1, *f.shape[1:]).expand(d, *f.shape)


def _bce_sqrt(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = f[0].numel()
    s = torch.sigmoid(f)
    root = (s * (1 - s)).sqrt()
    eye = torch.eye(d, dtype=f.dtype, device=f.device).reshape(d, 1, *f.shape[1:])
    return eye * root.unsqueeze(0)


CROSS_ENTROPY = LossRule(
    "cross-entropy",
    hessian=_ce_hessian,
    sqrt=_ce_sqrt,
    grad=lambda f, y: f.softmax(1) - _onehot(y, f),
    sample=_ce_sample,
    terms=lambda f: f.numel() // f.shape[1],
)
MSE = LossRule(
    "mean squared error",
    hessian=lambda f, y: lambda U: 2 * U,
    sqrt=_mse_sqrt,
    grad=lambda f, y: 2 * (f - y),
    # l = sum (f - y)^2 is -log N(y; f, I/2) + const: y = f + eps / sqrt(2)
    sample=lambda f, gen: (
        f + torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device) / math.sqrt(2.0)
    ),
    terms=lambda f: f.numel(),
)
BCE_WITH_LOGITS = LossRule(
    "binary cross-entropy with logits",
    hessian=_bce_hessian,
    sqrt=_bce_sqrt,
    grad=lambda f, y: torch.sigmoid(f) - y,
    sample=lambda f, gen: torch.bernoulli(torch.sigmoid(f), generator=gen),
    terms=lambda f: f.numel(),
)

#: Loss module types and functions with a registered rule (a module's reduction is read from it;
#: a function is taken with its default, ``"mean"``).
LOSSES: dict[Any, LossRule] = {
    nn.CrossEntropyLoss: CROSS_ENTROPY,
    nn.MSELoss: MSE,
    nn.BCEWithLogitsLoss: BCE_WITH_LOGITS,
    F.cross_entropy: CROSS_ENTROPY,
    F.mse_loss: MSE,
    F.binary_cross_entropy_with_logits: BCE_WITH_LOGITS,
}
SUPPORTED = (
    "nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss (reduction 'mean' or 'sum', no "
    "class weights or label smoothing) and F.cross_entropy, F.mse_loss, "
    "F.binary_cross_entropy_with_logits"
)


def loss_rule(fn: str, loss_fn: Any) -> tuple[LossRule, str]:
    """The rule and the reduction (``"mean"`` or ``"sum"``) of ``loss_fn``.

    Raises:
        TypeError: a loss without a registered rule, or one with options the rule does not model.
    """
    rule = LOSSES.get(type(loss_fn)) if isinstance(loss_fn, nn.Module) else None
    if rule is None and not isinstance(loss_fn, nn.Module):
        try:
            rule = LOSSES.get(loss_fn)
        except TypeError:  # unhashable
            rule = None
    if rule is None:
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else repr(loss_fn)
        raise TypeError(
            f"{fn}: loss_fn must be a loss with a known Hessian w.r.t. the output, got {name}. "
            f"Supported: {SUPPORTED}. For another loss pass loss_hessian=lambda output, y, U: "
            f"... (its Hessian w.r.t. the output, reduction included, applied to U, which has a "
            f"leading dimension of k vectors)"
        )
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{fn}: loss_fn must have reduction 'mean' or 'sum', got {reduction!r}. The curvature "
            f"is that of a scalar loss; construct the loss with reduction='mean'"
        )
    for option, neutral in (("weight", None), ("pos_weight", None), ("label_smoothing", 0.0)):
        value = getattr(loss_fn, option, neutral)
        if value is not None and not (neutral is not None and value == neutral):
            raise TypeError(
                f"{fn}: loss_fn has {option}={value!r}, which the registered {rule.name} Hessian "
                f"does not model. Drop it, or pass loss_hessian= with the Hessian of your loss"
            )
    return rule, reduction


def check_targets(fn: str, rule: LossRule, loss_fn: Any, f: torch.Tensor, y: Any) -> None:
    """Targets the rule can use: class indices for cross-entropy, output-shaped otherwise."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{fn}: the targets y must be a tensor, got {type(y).__name__}")
    if rule is CROSS_ENTROPY:
        if y.is_floating_point() or y.shape != f.shape[:1] + f.shape[2:]:
            raise ValueError(
                f"{fn}: cross-entropy targets must be class indices of shape "
                f"{tuple(f.shape[:1] + f.shape[2:])} for outputs {tuple(f.shape)}, got a "
                f"{y.dtype} tensor of shape {tuple(y.shape)}. Soft (probability) targets are not "
                f"supported; pass y.argmax(1)"
            )
        ignore = getattr(loss_fn, "ignore_index", -100)
        if bool((y == ignore).any()):
            raise ValueError(
                f"{fn}: the targets contain ignore_index={ignore}, which the registered Hessian "
                f"does not model; drop those samples from the batch"
            )
    elif y.shape != f.shape:
        raise ValueError(
            f"{fn}: the targets y must have the output's shape {tuple(f.shape)}, got "
            f"{tuple(y.shape)}"
        )
