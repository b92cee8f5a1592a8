"""Per-sample ingredients of GradientMonitor's diagnostics, from :mod:`gradlab.per_sample`.

On a diagnostic step the monitor runs one :class:`~gradlab.per_sample.PerSampleGradients`
context over that step's forward and backward (opened before the forward, finished when the next
forward starts, the history is read or the monitor exits: never inside the autograd engine's
callbacks). With ``g_i`` the gradient of sample i's loss term (no 1/B) restricted to a group of
parameters (one monitored module, or all of them) and ``m = (1/B) sum_i g_i`` (taken from the
gradient this backward contributed, before it is accumulated into ``.grad``), the ingredients
are, per group:

* ``ps_b``: ``B``;
* ``ps_sum_norm_sq``: ``sum_i ||g_i||^2``; ``ps_mean_sq``: ``||m||^2``;
* ``ps_sum_dot_sq``: ``sum_i (g_i . m)^2`` (the dot over the group: not a sum over modules);
* ``gsnr_sum`` and ``gsnr_numel``: ``sum_j m_j^2 / ((1/B) sum_i g_ij^2 - m_j^2 + eps)`` and the
  number of entries j;
* ``ns_num`` = ``S`` and ``ns_den`` = ``||m||^2 - S/B``, with ``S = (sum_i ||g_i||^2 - B ||m||^2)
  / (B - 1)`` (= ``1/(B-1) sum_i ||g_i - m||^2``), each an exponential moving average over the
  diagnostic steps when ``ema`` is set (numerator and denominator smoothed separately).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradlab.hooks._diagnostics import StepDiagnostics

__all__ = ["GSNR_EPS", "PER_SAMPLE", "PerSampleSteps"]

GSNR_EPS = 1e-5  # Cockpit's MeanGSNR epsilon
# diagnostics that need the per-sample engine, and the PerSampleGradients stats each needs
PER_SAMPLE: dict[str, tuple[str, ...]] = {
    "noise_scale": ("norm",),
    "norm_test": ("norm",),
    "gsnr": ("norm", "sum_sq"),
    "inner_product_test": ("norm", "dot"),
    "orthogonality_test": ("norm", "dot"),
    "alpha": ("dot",),  # projections onto the update (gradlab.hooks._alpha), not dots with m
    "tic": ("sum_sq",),  # (1/B) sum_i g_i^2 (gradlab.hooks._tic)
    "tic_trace": ("sum_sq",),
}


class PerSampleSteps:
    """Opens a PerSampleGradients context per diagnostic step and turns it into ingredients."""

    def __init__(
        self,
        model: Any,
        names: Sequence[str],
        owner: Sequence[int],
        groups: int,
        diagnostics: Sequence[str],
        loss_reduction: str,
        ema: float | None,
    ) -> None:
        self._model = model  # a weakref to the model
        self._names = list(names)
        self._owner = list(owner)
        self._groups = groups
        stats = {s for d in diagnostics if d in PER_SAMPLE for s in PER_SAMPLE[d]}
        self.stats = tuple(sorted(stats))
        self._reduction = loss_reduction
        self._ema = ema
        self._ema_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ps: Any = None  # the open context
        self._done: tuple[Any, StepDiagnostics | None, dict[str, torch.Tensor], Any] | None = None
        self._grads: dict[str, torch.Tensor] = {}  # this backward's gradient of each parameter
        self._warned = False
        # per-module dots from the engine's recorded calls (one pass), checked once against the
        # engine's public dot (another pass): should its internals have changed, the public
        # dot with zeros outside each module is used from then on (a pass per module)
        self._private_dots = True
        self._dots_checked = False
        # dots with m (the two tests); alpha's "dot" is for projections onto the update
        self._dot_m = any(d != "alpha" and "dot" in PER_SAMPLE.get(d, ()) for d in diagnostics)
        # called with (context, loss scale) once a step's statistics are taken; returns True
        # to keep the context open (alpha projects it onto the update later, then closes it)
        self.on_finish: Callable[[Any, Any], bool] | None = None

    def ema_state(self) -> list[list[float]] | None:
        """The noise scale's smoothed (numerator, denominator) per group, for a checkpoint."""
        if self._ema_state is None:
            return None
        return [t.tolist() for t in self._ema_state]

    def load_ema_state(self, state: list[list[float]] | None, device: Any = None) -> None:
        self._ema_state = (
            None
            if state is None
            else (
                torch.tensor(state[0], dtype=torch.float64, device=device),
                torch.tensor(state[1], dtype=torch.float64, device=device),
            )
        )

    @property
    def open(self) -> bool:
        return self._ps is not None and self._done is None

    def start(self) -> None:
        """Open the context for the coming forward and backward."""
        from gradlab.per_sample import PerSampleGradients

        model = self._model()
        if model is None:
            return
        ps = PerSampleGradients(model, stats=self.stats, loss_reduction=self._reduction)
        ps.__enter__()
        self._ps = ps
        self._grads = {}

    def grad(self, name: str, g: torch.Tensor) -> None:
        """A parameter's gradient from this backward (a leaf tensor hook), while open."""
        if self.open:
            self._grads[name] = g

    def backward_done(self, diag: StepDiagnostics | None, scale: Any) -> None:
        """The backward pass ended (an engine callback: nothing is computed here)."""
        if self._ps is None or self._done is not None:
            return
        # diag None: not a diagnostic step after all; dropped at finish(), not in this callback
        self._done = (self._ps, diag, self._grads, scale)
        self._grads = {}

    def close(self) -> None:
        """Exit an open context without computing anything."""
        ps, self._ps, self._done = self._ps, None, None
        if ps is not None:
            try:
                ps.__exit__(None, None, None)
            finally:
                ps.close()

    def finish(self) -> bool:
        """Compute the ingredients of a finished step, if any; True if one was finished."""
        if self._done is None:
            return False
        ps, diag, grads, scale = self._done
        self._ps = self._done = None
        keep = False
        try:
            ps.__exit__(None, None, None)
            if diag is not None:
                self._compute(ps, diag, grads, scale)
            if self.on_finish is not None:
                keep = self.on_finish(ps, scale)
        finally:
            if not keep:
                ps.close()
        return diag is not None

    def _compute(
        self, ps: Any, diag: StepDiagnostics, grads: dict[str, torch.Tensor], scale: Any
    ) -> None:
        b = ps.batch_size
        names = [n for n in self._names if n in grads]
        if not names:
            return
        g_count = self._groups
        group_of = {n: self._owner[self._names.index(n)] for n in names}
        with torch.no_grad():
            unscale = 1.0 if scale is None else 1.0 / float(scale)
            if self._reduction == "sum":
                unscale /= b
            # m in the gradient's own dtype (no copy without a scale); sums in float64
            m = {
                n: grads[n].detach() if unscale == 1.0 else grads[n].detach() * unscale
                for n in names
            }
            device = m[names[0]].device
            owner = torch.tensor([group_of[n] for n in names], device=device)

            def per_group(values: list[torch.Tensor]) -> torch.Tensor:
                out = torch.zeros(g_count, dtype=torch.float64, device=device)
                out.index_add_(0, owner, torch.stack([v.to(device, torch.float64) for v in values]))
                return torch.cat([out, out.sum().view(1)])

            norms = ps.norm_by_param
            sum_norm_sq = per_group([norms[n].to(torch.float64).square().sum() for n in names])
            mean_sq = per_group(
                [t.to(torch.float64).square() for t in torch._foreach_norm([m[n] for n in names])]
            )
            ones = torch.ones(g_count + 1, dtype=torch.float64, device=device)
            diag.set_all("ps_b", ones * b)
            diag.set_all("ps_sum_norm_sq", sum_norm_sq)
            diag.set_all("ps_mean_sq", mean_sq)
            if "sum_sq" in self.stats:
                sum_sq = ps.sum_sq
                terms = []
                for n in names:
                    m_sq = m[n].square()
                    den = sum_sq[n] / b  # (1/B) sum_i g_ij^2 - m_j^2 + eps
                    den.sub_(m_sq).add_(GSNR_EPS)
                    terms.append(m_sq.div_(den).sum(dtype=torch.float64))
                diag.set_all("gsnr_sum", per_group(terms))
                numel = [torch.tensor(float(m[n].numel()), dtype=torch.float64) for n in names]
                diag.set_all("gsnr_numel", per_group(numel))
            if self._dot_m:
                dots = _group_dots(
                    ps, m, group_of, g_count, b, device, self._model, private=self._private_dots
                )  # (G, B)
                if self._private_dots and not self._dots_checked:
                    self._dots_checked = True
                    self._private_dots = _agrees_with_public_dot(ps, m, dots, self._model)
                    if not self._private_dots:
                        dots = _group_dots(
                            ps, m, group_of, g_count, b, device, self._model, private=False
                        )
                sq = dots.square().sum(1)
                total = dots.sum(0).square().sum()
                diag.set_all("ps_sum_dot_sq", torch.cat([sq, total.view(1)]))
            if b > 1:
                s = (sum_norm_sq - b * mean_sq) / (b - 1)
                num, den = s, mean_sq - s / b
            else:
                num = den = torch.full_like(mean_sq, float("nan"))
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        "GradientMonitor: a diagnostic step had batch size 1: the gradient "
                        "variance S = 1/(B-1) sum_i ||g_i - m||^2 is undefined, so noise_scale, "
                        "norm_test, inner_product_test and orthogonality_test are NaN for it "
                        "(warned once)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            if self._ema is not None and b > 1:
                a = self._ema
                if self._ema_state is None:
                    self._ema_state = (torch.zeros_like(num), torch.zeros_like(den))
                old_num, old_den = self._ema_state
                num = a * old_num + (1 - a) * num
                den = a * old_den + (1 - a) * den
                self._ema_state = (num, den)
            diag.set_all("ns_num", num)
            diag.set_all("ns_den", den)


def _group_dots(
    ps: Any,
    m: dict[str, torch.Tensor],
    group_of: dict[str, int],
    groups: int,
    b: int,
    device: torch.device,
    model_ref: Any,
    *,
    private: bool = True,
) -> torch.Tensor:
    """(G, B): ``g_i . m`` over each group's parameters.

    The engine's :meth:`~gradlab.per_sample.PerSampleGradients.dot` sums over every parameter;
    a group's dot through it would pass zeros for the others and cost a full pass per group.
    Each call the engine recorded belongs to one module, so its rule's dot is taken once, with
    ``m``, and added to its module's group (the engine's own records and rules: the same
    computation as ``dot``). Should the engine's internals change, the public ``dot`` with
    zeros elsewhere is used (G passes, same result).
    """
    out = torch.zeros(groups, b, dtype=torch.float64, device=device)
    records, replayed = getattr(ps, "_records", None), getattr(ps, "_dot_grads", None)
    if (
        private
        and isinstance(records, list)
        and isinstance(replayed, dict)
        and not getattr(ps, "_closed", True)
    ):
        for call in records:
            by_group: dict[int, dict[str, torch.Tensor]] = {}  # a call's names: one group, mostly
            for ln, n in call.names.items():
                if n in group_of:
                    by_group.setdefault(group_of[n], {})[ln] = m[n]
            for gi, vv in by_group.items():
                if call.rule.dot is not None:
                    part = call.rule.dot(call.module, call.a, call.d, vv)
                else:
                    gs = call.rule.grad(call.module, call.a, call.d, tuple(vv))
                    part = sum((gs[ln] * vv[ln].to(gs[ln].dtype)).flatten(1).sum(1) for ln in gs)
                out[gi] += part.to(torch.float64) * getattr(call, "factor", 1.0)
        for n, g in replayed.items():
            if n in group_of:
                out[group_of[n]] += (g * m[n].to(g.dtype)).flatten(1).sum(1).to(torch.float64)
        return out
    params = dict(model_ref().named_parameters())
    zeros = {n: torch.zeros_like(p) for n, p in params.items() if p.requires_grad}
    for g_index in range(groups):
        v = dict(zeros)
        for n, gi in group_of.items():
            if gi == g_index:
                v[n] = m[n].to(zeros[n].dtype)
        out[g_index] = ps.dot(v).to(torch.float64)
    return out


def _agrees_with_public_dot(
    ps: Any, m: dict[str, torch.Tensor], dots: torch.Tensor, model_ref: Any
) -> bool:
    """Whether the per-module dots add up to the engine's public ``dot`` (to rounding)."""
    params = {n: p for n, p in model_ref().named_parameters() if p.requires_grad}
    v = {n: m[n].to(p.dtype) if n in m else torch.zeros_like(p) for n, p in params.items()}
    try:
        public = ps.dot(v).to(torch.float64)
    except Exception:  # the engine refuses: keep what it gave through its records
        return True
    total = dots.sum(0)
    scale = float(public.abs().max()) if public.numel() else 0.0
    eps = torch.finfo(next(iter(m.values())).dtype).eps
    tol = 1e3 * eps * max(scale, 1e-30) * max(1, len(params))
    return bool(float((total - public).abs().max()) <= tol) if public.numel() else True
