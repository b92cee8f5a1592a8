r"""The Takeuchi information criterion (TIC) of GradientMonitor, from the exact Hessian diagonal.

Thomas et al. (2019), "On the interplay between noise and curvature and its effect on
optimization and generalization"; Cockpit's ``TICDiag`` and ``TICTrace`` with the exact Hessian
diagonal (``curvature="diag_h"``). With ``v_j = (1/B) sum_i g_ij^2`` (the uncentered second
moment of the per-sample gradients, from the per-sample pass's ``sum_sq``) and ``h_j`` the
diagonal of the Hessian of the mean loss of the step's batch at the step's parameters
(:func:`gradlab.hessian_diagonal`, ``method="exact"``), per group of parameters:

* ``tic`` = ``sum_j v_j / (h_j + eps)`` and ``tic_trace`` = ``sum_j v_j / (sum_j h_j + eps)``,
  ``eps = 1e-7``;

from the ingredients ``tic_sum`` = ``sum_j v_j / (h_j + eps)``, ``tic_v`` = ``sum_j v_j``,
``tic_h`` = ``sum_j h_j``.

The Hessian needs the loss as a function: :meth:`GradientMonitor.record_tic` gets
``loss_fn(model)`` and evaluates it on a hook-free copy of the model (the monitor's and the
per-sample engine's hooks must not see those passes), right away: call it before the optimizer
step. Whichever of ``h`` (that call) and ``v`` (the per-sample pass, finished later or earlier)
comes second forms the ingredients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["TIC_EPS", "TicSteps"]

TIC_EPS = 1e-7  # Cockpit's TIC epsilon


class TicSteps:
    """Hessian diagonals and second moments of the TIC steps, joined into ingredients."""

    def __init__(
        self, model: Any, names: Sequence[str], owner: Sequence[int], groups: int, reduction: str
    ) -> None:
        self._model = model  # a weakref
        self._names = list(names)
        self._owner = torch.tensor(list(owner), dtype=torch.long)
        self._groups = groups
        self._reduction = reduction
        self._h: dict[int, dict[str, torch.Tensor]] = {}  # step -> Hessian diagonal
        self._v: dict[int, dict[str, torch.Tensor]] = {}  # step -> (1/B) sum_i g_i^2
        self._diag: dict[int, Any] = {}  # step -> its StepDiagnostics
        self._b: dict[int, int] = {}  # step -> its batch size
        self.done: set[int] = set()  # steps whose Hessian diagonal was taken

    def hessian(
        self, fn: str, step: int, diag: Any, loss_fn: Callable[[nn.Module], torch.Tensor]
    ) -> None:
        """The exact Hessian diagonal of ``loss_fn(copy of the model)`` for step ``step``."""
        from gradlab.curvature import hessian_diagonal

        model = self._model()
        if model is None:
            return
        try:
            twin = copy.deepcopy(model)
        except Exception as e:  # e.g. a module holding a lock or a process group
            raise TypeError(
                f"{fn}: the TIC evaluates loss_fn on a copy of the model (so the monitor's "
                f"hooks do not see the Hessian passes), but copy.deepcopy(model) failed: {e}. "
                "Monitor the inner module (model.module under DDP) for 'tic'"
            ) from None
        for p in twin.parameters():
            p.grad = None
        for m in twin.modules():  # the copy's hooks are the monitor's: drop them
            for hooks in (
                m._forward_hooks,
                m._forward_pre_hooks,
                m._backward_hooks,
                m._backward_pre_hooks,
            ):
                hooks.clear()
        loss = loss_fn(twin)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{fn}: loss_fn must return the step's loss as a scalar tensor, got {got}. "
                "Return the mean (or, with loss_reduction='sum', the sum) of the batch's losses"
            )
        params = dict(twin.named_parameters())
        wanted = [params[n] for n in self._names]
        h = hessian_diagonal(lambda: loss_fn(twin), wanted, method="exact")
        self._h = {step: {n: t.detach() for n, t in zip(self._names, h)}}
        if diag is not None:
            self._diag[step] = diag
        self.done = {s for s in self.done if s >= step - 2} | {step}
        self._join(step)

    def moments(self, step: int, ps: Any, scale: Any, diag: Any) -> None:
        """A per-sample context of step ``step`` finished: keep ``v`` if the step needs it."""
        if diag is None:
            return
        b = ps.batch_size
        factor = 1.0 / b
        if scale is not None and getattr(ps, "_scaler", None) is None:
            factor /= float(scale) ** 2
        with torch.no_grad():
            sum_sq = ps.sum_sq
            self._v = {step: {n: sum_sq[n].detach() * factor for n in self._names}}
        self._b = {step: b}
        self._diag = {s: d for s, d in self._diag.items() if s >= step} | {step: diag}
        self._join(step)

    def _join(self, step: int) -> None:
        h, v, diag = self._h.get(step), self._v.get(step), self._diag.get(step)
        if h is None or v is None or diag is None:
            return
        # with loss_reduction="sum" loss_fn returns the sum: the mean's Hessian is 1/B of it
        b = self._b[step] if self._reduction == "sum" else 1
        self._h, self._v, self._diag = {}, {}, {}
        with torch.no_grad():
            names = self._names
            device = v[names[0]].device
            owner = self._owner.to(device)

            def per_group(values: list[torch.Tensor]) -> torch.Tensor:
                out = torch.zeros(self._groups, dtype=torch.float64, device=device)
                return out.index_add_(0, owner, torch.stack(values))

            v64 = [v[n].to(torch.float64) for n in names]
            h64 = [h[n].to(device, torch.float64) / b for n in names]
            ratio = [(a / (b + TIC_EPS)).sum() for a, b in zip(v64, h64)]
            diag.set("tic_sum", per_group(ratio))
            diag.set("tic_v", per_group([a.sum() for a in v64]))
            diag.set("tic_h", per_group([b.sum() for b in h64]))
