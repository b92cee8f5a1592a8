r"""The step-size quality ``alpha`` of GradientMonitor, for any optimizer.

``alpha`` (Mahsereci & Hennig 2017, "Probabilistic line searches"; Cockpit's ``Alpha``,
Schneider et al. 2021) asks where the step of the optimizer landed on a noise-aware quadratic
fit of the loss along that step. With ``d = theta_{t+1} - theta_t`` the *actual* parameter
change made after backward t (whatever the optimizer: SGD, momentum, Adam, ...), ``t = ||d||``
and the direction ``u = d / ||d||``, four noisy observations of the loss along ``u`` are taken:

* start point (step t, at ``theta_t``): ``f_0 = (1/B) sum_i l_i`` and its per-sample variance
  ``v_0 = 1/(B-1) sum_i (l_i - f_0)^2``; the per-sample projections ``p_i = g_i . u`` of step
  t's per-sample gradients, their mean ``df_0`` and unbiased variance ``vd_0``;
* end point (step t+1, at ``theta_{t+1}``, its own batch): ``f_1``, ``v_1``, ``df_1``,
  ``vd_1`` likewise, projecting step t+1's per-sample gradients onto the same ``u``.

The quadratic ``q(x) = c + b x + a x^2`` is fitted by weighted least squares (weights the
inverse variances; a variance of exactly 0 is replaced by 1e-10) to ``q(0) = f_0``,
``q(t) = f_1``, ``q'(0) = df_0``, ``q'(t) = df_1``::

    Phi = [[1, 0, 0], [1, t, t^2], [0, 1, 0], [0, 1, 2t]],  y = (f_0, f_1, df_0, df_1),
    W = diag(1/v_0, 1/v_1, 1/vd_0, 1/vd_1),  (c, b, a) = argmin (y - Phi mu)^T W (y - Phi mu)

and, with ``alpha_bar = -b / a`` (the step that lands on the other side of the parabola at the
start point's height), ``alpha = 2 t / alpha_bar - 1``: -1 stays put, 0 lands on the minimum, 1
on the other side (overshoot beyond). Conventions: a concave or flat fit (``a <= 0``, still
going downhill) and a zero step (``t = 0``) give -1; missing observations give NaN.

The start point's projections need ``d``, known only after the optimizer step: the per-sample
context of step t (``"dot"``) is kept after its statistics are taken and projected onto ``d``
when the model's next forward starts (or the monitor exits), then closed; step t+1's context is
projected onto the same ``d`` when it finishes. alpha of step t is stored with step t's
diagnostics once step t+1 is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ALPHA_NEEDS", "AlphaSteps", "alpha_from_observations"]

_ZERO_VAR = 1e-10  # a variance of exactly 0 (identical samples) would give an infinite weight

#: alpha's ingredients (whole model): ||d||, the losses at both ends, the projections' moments
ALPHA_NEEDS = (
    "alpha_t",
    "loss_mean",
    "alpha_f1",
    "alpha_df0",
    "alpha_df1",
    "loss_var",
    "alpha_vf1",
    "alpha_vdf0",
    "alpha_vdf1",
)


def alpha_from_observations(g: Mapping[str, float]) -> float:
    """alpha from the ingredients named in :data:`ALPHA_NEEDS` (see the module docstring)."""
    t = g["alpha_t"]
    f = (g["loss_mean"], g["alpha_f1"], g["alpha_df0"], g["alpha_df1"])
    var = (g["loss_var"], g["alpha_vf1"], g["alpha_vdf0"], g["alpha_vdf1"])
    if math.isfinite(t) and t == 0.0:
        return -1.0  # no step: nothing overshot
    if not all(math.isfinite(x) for x in (t, *f, *var)):
        return math.nan
    phi = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
    w = 1.0 / np.sqrt([v if v != 0.0 else _ZERO_VAR for v in var])
    # the weighted problem solved as least squares on sqrt(W) Phi (conditioned as Phi, not as
    # the normal equations' Phi^T W Phi)
    mu, _, rank, _ = np.linalg.lstsq(phi * w[:, None], np.asarray(f) * w, rcond=None)
    if rank < 3:
        return math.nan
    b, a = float(mu[1]), float(mu[2])
    if a <= 0.0:
        return -1.0  # concave or flat along the step: still going downhill
    return 2.0 * t * a / -b - 1.0  # 2 t / alpha_bar - 1, alpha_bar = -b / a


@dataclass(eq=False)
class _Start:
    """A start point waiting for its update: step t's diagnostics, theta_t, its context."""

    diag: Any  # StepDiagnostics
    snapshot: list[torch.Tensor]
    ps: Any = None  # the kept PerSampleGradients context (with "dot")
    scale: Any = None  # its loss scale (GradScaler), or None


class AlphaSteps:
    """Projections of per-sample gradients onto the actual update, for ``alpha``.

    ``model`` is a weakref to the model, ``names`` the monitored trainable parameters (the
    update is taken over them; other trainable parameters count as not moving).
    """

    def __init__(self, model: Any, names: Sequence[str], every: int) -> None:
        self._model = model
        self._names = list(names)
        self.every = every
        self._step: int | None = None  # step of the context whose backward finished
        self._start: dict[int, _Start] = {}  # at most one start point waits for its update
        # the last start point's (step, diagnostics, d over every trainable parameter, ||d||)
        self._last: tuple[int, Any, dict[str, torch.Tensor], torch.Tensor] | None = None
        self.sizes: dict[int, int] = {}  # step -> B its per-sample context saw

    def wants_context(self, step: int) -> bool:
        """Whether step ``step`` needs a per-sample context: a start or an end point."""
        return step % self.every == 0 or (step >= 1 and (step - 1) % self.every == 0)

    def backward_done(
        self, step: int, diag: Any, params: list[torch.Tensor] | None, context_open: bool
    ) -> None:
        """Backward ``step`` finished (an engine callback: only a copy of the parameters)."""
        if context_open:
            self._step = step
        if diag is not None and params:
            for rec in self._start.values():  # a start whose parameters never moved
                _close(rec)
            with torch.no_grad():
                self._start = {step: _Start(diag, [p.detach().clone() for p in params])}

    def context_done(self, ps: Any, scale: Any) -> bool:
        """A per-sample context finished (statistics taken); True: it is kept for the update."""
        step, self._step = self._step, None
        if step is None:
            return False
        self.sizes = {s: b for s, b in self.sizes.items() if s >= step - 2}
        self.sizes[step] = ps.batch_size
        last = self._last
        if last is not None and last[0] == step - 1:  # the end point of step - 1's alpha
            self._last = None
            mean, var = _projections(ps, last[2], last[3], scale)
            last[1].set_total("alpha_df1", mean)
            last[1].set_total("alpha_vdf1", var)
        rec = self._start.get(step)
        if rec is not None and rec.ps is None:
            rec.ps, rec.scale = ps, scale
            return True
        return False

    def skip(self) -> None:
        """The finished context has no statistics (a second backward pass): the alpha that
        needs them, as a start or an end point, stays NaN."""
        self._step = None

    def params_moved(self, params: list[torch.Tensor] | None) -> None:
        """The model's next forward starts (or the monitor exits): the update is known."""
        if not self._start:
            return
        ((step, rec),) = self._start.items()
        self._start = {}
        try:
            if params is None:
                return
            with torch.no_grad():
                d = torch._foreach_sub([p.detach() for p in params], rec.snapshot)
                rec.snapshot = []
                norms = torch._foreach_norm(d)
                norm = torch.stack([n.to(torch.float64) for n in norms]).square().sum().sqrt()
                rec.diag.set_total("alpha_t", norm)
                full = self._full(d)
                if full is None:
                    return
                if rec.ps is not None:
                    mean, var = _projections(rec.ps, full, norm, rec.scale)
                    rec.diag.set_total("alpha_df0", mean)
                    rec.diag.set_total("alpha_vdf0", var)
                self._last = (step, rec.diag, full, norm)
        finally:
            _close(rec)

    def close(self) -> None:
        """Drop every kept context and copy."""
        for rec in self._start.values():
            _close(rec)
        self._start = {}
        self._last = None

    def _full(self, d: Sequence[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``d`` over every trainable parameter of the model (zero for unmonitored ones)."""
        model = self._model()
        if model is None:
            return None
        mine = dict(zip(self._names, d))
        return {
            n: mine[n] if n in mine else torch.zeros_like(p)
            for n, p in model.named_parameters()
            if p.requires_grad
        }


def _projections(
    ps: Any, d: dict[str, torch.Tensor], norm: torch.Tensor, scale: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of ``g_i . d / ||d||`` over the context's samples."""
    with torch.no_grad():
        dots = ps.dot(d).to(torch.float64)
        if scale is not None and getattr(ps, "_scaler", None) is None:
            dots = dots / float(scale)  # the engine saw the scaled loss; the losses are not
        p = dots / norm.to(dots.device)
        mean = p.mean()
        var = p.var(correction=1) if p.numel() > 1 else torch.full_like(mean, math.nan)
        return mean, var


def _close(rec: _Start) -> None:
    ps, rec.ps = rec.ps, None
    rec.snapshot = []
    if ps is not None:
        ps.close()
