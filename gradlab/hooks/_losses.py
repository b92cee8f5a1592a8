"""Per-sample losses handed to GradientMonitor (``record_loss``): ``loss_mean``, ``loss_var``.

The losses belong to the step whose forward ran last (the monitor's forward pre-hook marks it),
so :meth:`GradientMonitor.record_loss` may be called before or after ``backward()``. With
``l_i`` the loss of sample i, the ingredients of step s, whole model only, are

* ``loss_mean`` = ``(1/B) sum_i l_i`` and ``loss_var`` = ``1/(B-1) sum_i (l_i - mean)^2``
  (NaN for B = 1), set on diagnostic steps;
* ``alpha_f1`` and ``alpha_vf1``: the same two numbers, set on step s - 1's diagnostics when
  ``alpha`` is asked for (the end point of the step-size fit of step s - 1).

Both stay tensors (no synchronisation) until the diagnostics are read.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradlab.hooks._diagnostics import StepDiagnostics

__all__ = ["LOSS_DIAGNOSTICS", "LossSteps", "check_losses"]

# diagnostics that need the per-sample losses of their step (and alpha those of the next one)
LOSS_DIAGNOSTICS = ("loss_mean", "loss_var", "alpha")


def check_losses(fn: str, losses: object) -> torch.Tensor:
    """The losses as a detached float64 copy, or a clear error."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"{fn}: losses must be a tensor of per-sample losses of shape (B,), got "
            f"{type(losses).__name__}. Compute the loss with reduction='none', e.g. "
            "nn.functional.cross_entropy(out, y, reduction='none')"
        )
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"{fn}: losses must have shape (B,), one loss per sample, got shape "
            f"{tuple(losses.shape)}. Reduce every dimension but the batch first (e.g. "
            "losses.flatten(1).sum(1)), with reduction='none' in the loss function"
        )
    if not losses.is_floating_point():
        raise TypeError(
            f"{fn}: losses must be a real floating-point tensor, got dtype {losses.dtype}. "
            "Pass the per-sample losses themselves"
        )
    with torch.no_grad():
        return losses.detach().to(torch.float64, copy=True)


def _stats(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) as 0-dim float64 tensors; the variance is NaN for B = 1."""
    mean = losses.mean()
    if losses.numel() < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, losses.var(correction=1)


class LossSteps:
    """The per-sample losses of the recent steps, turned into diagnostic ingredients."""

    def __init__(self, diagnostics: tuple[str, ...], history: Any) -> None:
        self.loss = any(d in diagnostics for d in ("loss_mean", "loss_var", "alpha"))
        self.alpha = "alpha" in diagnostics
        self._history = history  # its ``extras``: step -> StepDiagnostics (replaced on load)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # before its backward
        self._seen: set[int] = set()  # steps that got their losses (refuse a second call)
        self.sizes: dict[int, int] = {}  # step -> B of its losses

    def record(self, fn: str, step: int, losses: torch.Tensor) -> None:
        """Losses of ``step``: its own diagnostics (now or at its backward), and alpha's end
        point on step - 1."""
        if step in self._seen:
            raise ValueError(
                f"{fn}: the losses of step {step} were already recorded; call record_loss "
                "once per step (after the model's forward, before or after backward())"
            )
        self._seen = {s for s in self._seen if s >= step - 2} | {step}
        self.sizes = {s: b for s, b in self.sizes.items() if s >= step - 2}
        self.sizes[step] = losses.numel()
        mean, var = _stats(losses)
        diag = self._history.extras.get(step)
        if isinstance(diag, StepDiagnostics):
            _set(diag, mean, var)
        else:  # its backward has not run yet: attached when it does
            self._pending = {s: v for s, v in self._pending.items() if s >= step - 2}
            self._pending[step] = (mean, var)
        if self.alpha:
            before = self._history.extras.get(step - 1)
            if isinstance(before, StepDiagnostics):
                before.set_total("alpha_f1", mean)
                before.set_total("alpha_vf1", var)

    def reset(self) -> None:
        """Forget the losses of the steps so far (a checkpoint was loaded)."""
        self._pending, self._seen, self.sizes = {}, set(), {}

    def attach(self, step: int, diag: StepDiagnostics) -> None:
        """Step ``step``'s backward made its diagnostics: add the losses recorded before it."""
        got = self._pending.pop(step, None)
        if got is not None:
            _set(diag, *got)


def _set(diag: StepDiagnostics, mean: torch.Tensor, var: torch.Tensor) -> None:
    diag.set_total("loss_mean", mean)
    diag.set_total("loss_var", var)
