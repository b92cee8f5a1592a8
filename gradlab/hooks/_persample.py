"""Per-sample ingredients of GradientMonitor's diagnostics, from :mod:`gradlab.per_sample`.

On a diagnostic step the monitor runs one :class:`~gradlab.per_sample.PerSampleGradients`
context over that step's forward and backward (opened before the forward, finished when the next
forward starts, the history is read or the monitor exits: never inside the autograd engine's
callbacks). The engine's module and parameter hooks stay installed from one diagnostic step to
the next (inactive in between) and come off for a step without diagnostics and at exit. With
``g_i`` the gradient of sample i's loss term (no 1/B) restricted to a group of parameters (one
monitored module, or all of them) and ``m = (1/B) sum_i g_i`` (from the gradient this backward
contributed, read by a leaf hook before it is accumulated into ``.grad`` and never held: its
squared norm, and for ``gsnr`` the parameter's GSNR sum taken there from the engine's
``sum_i g_i^2`` where it is ready, else a copy into a buffer kept between steps; the dots
``g_i . m`` come from the engine's ``dot_mean``, whose ``m`` is the mean of its ``g_i``), the
ingredients are, per group:

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
from gradlab.hooks._stats import GsnrScratch, as_float64, blas_sum_sq

__all__ = ["GSNR_EPS", "PER_SAMPLE", "PerSampleSteps"]

GSNR_EPS = 1e-5  # Cockpit's MeanGSNR epsilon
_LOW = (torch.float16, torch.bfloat16)
# (groups + 1) x parameters up to this: per-group sums by one product with a 0/1 matrix
_MATRIX_MAX = 4096
# diagnostics that need the per-sample engine, and the PerSampleGradients stats each needs
PER_SAMPLE: dict[str, tuple[str, ...]] = {
    "noise_scale": ("norm",),
    "norm_test": ("norm",),
    "gsnr": ("norm", "sum_sq"),
    "inner_product_test": ("norm", "dot_mean"),
    "orthogonality_test": ("norm", "dot_mean"),
    "alpha": ("dot",),  # projections onto the update (gradlab.hooks._alpha)
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
        scaler: Any = None,
    ) -> None:
        self._model = model  # a weakref to the model
        self._names = list(names)
        self._owner = list(owner)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._groups = groups
        self._summer: tuple[Any, Callable[[torch.Tensor], torch.Tensor]] | None = None
        stats = {s for d in diagnostics if d in PER_SAMPLE for s in PER_SAMPLE[d]}
        self.stats = tuple(sorted(stats))
        self._reduction = loss_reduction
        self._ema = ema
        self._ema_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ps: Any = None  # the open context
        self._engine: Any = None
        self._done: tuple[Any, StepDiagnostics | None, dict[str, Any], Any] | None = None
        # per parameter of this backward: (||g||^2, its gsnr term, a copy of g): see grad()
        self._grads: dict[str, tuple[Any, Any, torch.Tensor | None]] = {}
        self._buffers: dict[str, torch.Tensor] = {}  # gsnr: the gradients, kept between steps
        self._gsnr = "gsnr" in diagnostics
        # the engine's sum_sq is ours to overwrite in the leaf hooks unless TIC reads it later
        self._v_ours = not {"tic", "tic_trace"} & set(diagnostics)
        self._scratch = GsnrScratch()
        self._numel: tuple[Any, torch.Tensor] | None = None  # gsnr_numel per group
        self._warned = False
        self._warned_second = False
        self._scaler = scaler
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
        ps = self._engine
        if ps is None:  # one engine for the run, entered per diagnostic step
            ps = self._engine = PerSampleGradients(
                model, stats=self.stats, loss_reduction=self._reduction, scaler=self._scaler
            )
            # its module hooks stay (inactive between steps) until release; our leaf hooks
            # report the parameters' gradients (grad()): it hooks no parameter of ours
            ps._keep_installed(notified=self._names)
        ps.__enter__()
        self._ps = ps
        self._grads = {}

    def grad(self, name: str, g: torch.Tensor) -> None:
        """A parameter's gradient from this backward (a leaf tensor hook), while open.

        Never kept: holding it would make autograd copy it into ``.grad`` instead of moving
        it (a fresh parameter-sized allocation per step). Kept, as ``(||g||^2, gsnr term,
        copy)``: ``||g||^2`` (a float from one BLAS dot while ``g`` is in cache, where it can;
        else a 0-dim tensor, or None beside a copy: a norm of the copy later); for ``gsnr``,
        where the engine already has this parameter's ``v_j = sum_i g_ij^2`` (one call of one
        module with a closed form: its output-gradient hook ran before this one), the
        parameter's GSNR sum, taken here while ``g`` is in cache
        (:class:`~gradlab.hooks._stats.GsnrScratch`, or three torch ops); else (a parameter
        used several times, a module replayed by the fallback, half precision) a copy of
        ``g`` in a buffer kept from step to step, summed at :meth:`finish`.
        """
        engine = self._engine
        if engine is not None:  # in place of its own post-accumulate hook (_keep_installed)
            engine._on_param_grad(name)
        if not self.open:
            return
        g = g.detach() if g.requires_grad else g  # a double backward's: no graph to record
        if self._gsnr:
            found = self._gsnr_term(name, g)
            if found is not None:
                self._grads[name] = (found[1], found[0], None)
                return
        sq = blas_sum_sq(g)
        if self._gsnr:
            buf = self._buffers.get(name)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                buf = self._buffers[name] = torch.empty_like(g)
            self._grads[name] = (sq, None, buf.copy_(g))
            return
        if sq is None:
            sq = torch.linalg.vector_norm(g).square()
        self._grads[name] = (sq, None, None)

    def _gsnr_term(self, name: str, g: torch.Tensor) -> Any:
        """``(sum_j m_j^2 / ((1/B) v_j - m_j^2 + eps) / B, ||g||^2)`` of one parameter (floats,
        or 0-dim tensors), from the engine's ``v`` if it is there already; else None.
        Overwrites ``v`` (recomputed every step) unless TIC reads it later."""
        engine = self._engine
        v = engine._sum_sq.get(name)
        b = engine._b
        if v is None or b is None or v.shape != g.shape or v.dtype != g.dtype or g.dtype in _LOW:
            return None
        if name in engine._unscaled:  # v is that of the output gradient as it came: scaled at
            return None  # the engine's finish (a layer whose statistics are smaller than d)
        u = engine._factor(b) / b  # m = u g: the loss scale and the reduction undone
        found = self._scratch.term(g, v, b, u, GSNR_EPS, self._v_ours)
        if found is None and v.device == g.device:  # CUDA, non-contiguous: no copy either
            den = torch.addcmul(v, g, g, value=-b * u * u).add_(b * GSNR_EPS)
            term = torch.dot(g.reshape(-1), torch.div(g, den, out=den).reshape(-1)) * (u * u)
            found = (term, torch.linalg.vector_norm(g).square())
        return found

    def backward_done(self, diag: StepDiagnostics | None, scale: Any) -> None:
        """The backward pass ended (an engine callback: nothing is computed here)."""
        if self._ps is None or self._done is not None:
            return
        # diag None: not a diagnostic step after all; dropped at finish(), not in this callback
        self._done = (self._ps, diag, self._grads, scale)
        self._grads = {}

    def idle(self) -> None:
        """A step without a context: remove the engine's hooks (kept from step to step while
        every step has one), so that such a step pays nothing."""
        if self._engine is not None and not self.open:
            self._engine._uninstall()

    def release(self) -> None:
        """Drop the engine (it holds the model) and the kept buffers: the monitor exited."""
        if self._engine is not None:
            self._engine._uninstall()
        self._engine = None
        self._buffers = {}

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
            if self.on_finish is not None:  # first: _compute overwrites the engine's sum_sq
                keep = self.on_finish(ps, scale)
            if ps._second is not None:  # two backward passes: no per-sample statistics
                self._warn_second(ps._second)
            elif diag is not None:
                self._compute(ps, diag, grads, scale)
        finally:
            if not keep:
                ps.close()
        return diag is not None

    def _warn_second(self, reached: str) -> None:
        if self._warned_second:
            return
        self._warned_second = True
        warnings.warn(
            "GradientMonitor: a diagnostic step ran a second backward pass through its forward "
            f"(it reached {reached}), as a gradient penalty does (autograd.grad(..., "
            "create_graph=True), then backward: WGAN-GP, R1, path length). Per-sample "
            "statistics exist for one backward pass of a per-sample loss, so the per-sample "
            "diagnostics of such steps are NaN (warned once). Steps with one backward pass (a "
            "lazy penalty's other steps) are not affected",
            RuntimeWarning,
            stacklevel=2,
        )

    def _group_sum(self, names: list[str], device: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function of ``(P, ...)`` per-parameter values -> ``(G + 1, ...)``: each group's sum,
        then the total. Few parameters: one product with a kept ``(G + 1, P)`` 0/1 matrix (one
        op); many: ``index_add`` (the matrix would cost ``O(G P)`` memory and work)."""
        key = (tuple(names), device)
        hit = self._summer
        if hit is None or hit[0] != key:
            owner = torch.tensor([self._owner[self._index[n]] for n in names], dtype=torch.long)
            groups = self._groups
            if (groups + 1) * len(names) <= _MATRIX_MAX:
                mat = torch.zeros(groups + 1, len(names), dtype=torch.float64)
                mat[owner, torch.arange(len(names))] = 1.0
                mat[-1] = 1.0
                mat = mat.to(device)

                def fn(values: torch.Tensor) -> torch.Tensor:
                    return mat @ values

            else:
                index = owner.to(device)

                def fn(values: torch.Tensor) -> torch.Tensor:
                    out = values.new_zeros(groups, *values.shape[1:])
                    out.index_add_(0, index, values)
                    return torch.cat([out, values.sum(0, keepdim=True)])

            hit = self._summer = (key, fn)
        return hit[1]

    def _compute(self, ps: Any, diag: StepDiagnostics, grads: dict[str, Any], scale: Any) -> None:
        b = ps.batch_size
        names = [n for n in self._names if n in grads]
        if not names:
            return
        f64 = torch.float64
        with torch.no_grad():
            unscale = 1.0 if scale is None else 1.0 / float(scale)
            if self._reduction == "sum":
                unscale /= b
            norms_sq = ps._norms_sq()  # {name: (B,)} squared: the engine's own, not sqrt'ed
            device = norms_sq[names[0]].device
            group_sum = self._group_sum(names, device)

            def per_group(values: list[Any] | torch.Tensor) -> torch.Tensor:
                if isinstance(values, list):
                    values = as_float64(values, device)
                return group_sum(values.to(f64))

            per_sample = torch.stack([norms_sq[n].to(device) for n in names])  # (P, B)
            sum_norm_sq = per_group(per_sample.sum(1, dtype=f64))
            diag.set_all("ps_b", torch.full_like(sum_norm_sq, float(b)))
            diag.set_all("ps_sum_norm_sq", sum_norm_sq)
            sqs = [grads[n][0] for n in names]
            if self._gsnr:
                terms = [grads[n][1] for n in names]
                copied = [i for i, n in enumerate(names) if grads[n][2] is not None]
                if copied:
                    self._copied_terms(ps, names, grads, copied, sqs, terms, b, unscale)
                diag.set_all("gsnr_sum", per_group(terms) * b)
                key = (tuple(names), device)  # read only (StepDiagnostics.values): shared
                if self._numel is None or self._numel[0] != key:
                    numel = [float(ps._params[n].numel()) for n in names]
                    self._numel = (key, per_group(numel))
                diag.set_all("gsnr_numel", self._numel[1])
            mean_sq = per_group(sqs) * (unscale * unscale)
            diag.set_all("ps_mean_sq", mean_sq)
            if "dot_mean" in self.stats:
                # g_i . m over a group is the sum of its parameters' terms (the engine's m is
                # the mean of its g_i: this backward's gradient, to rounding)
                by_param = ps.dot_mean_by_param
                dots = group_sum(torch.stack([by_param[n] for n in names]).to(f64))  # (G + 1, B)
                diag.set_all("ps_sum_dot_sq", dots.square().sum(1))
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

    def _copied_terms(
        self,
        ps: Any,
        names: list[str],
        grads: dict[str, Any],
        copied: list[int],
        sqs: list[Any],
        terms: list[Any],
        b: int,
        unscale: float,
    ) -> None:
        """The gsnr terms (and missing ``||g||^2``) of the parameters whose gradients were
        copied (see :meth:`grad`), written into ``terms`` and ``sqs`` at their positions."""
        m = [grads[names[i]][2] for i in copied]  # our buffers: overwritten here
        unnormed = [k for k, i in enumerate(copied) if sqs[i] is None]
        if unnormed:
            norms = torch._foreach_norm([m[k] for k in unnormed])
            for k, t in zip(unnormed, norms):
                sqs[copied[k]] = t.to(torch.float64).square()
        if unscale != 1.0:
            torch._foreach_mul_(m, unscale)
        # the engine's sum_sq tensors are recomputed every step: ours to overwrite
        sum_sq = ps.sum_sq
        gsnr_den = [sum_sq[names[i]] for i in copied]
        # m_j^2 / ((1/B) v_j - m_j^2 + eps) = B m_j^2 / (v_j - B m_j^2 + B eps), v_j =
        # sum_i g_ij^2: four passes (no division of v by B); the B is the caller's
        torch._foreach_mul_(m, m)  # m_j^2
        torch._foreach_add_(gsnr_den, m, alpha=-float(b))  # v_j - B m_j^2
        torch._foreach_add_(gsnr_den, b * GSNR_EPS)
        torch._foreach_div_(m, gsnr_den)
        # summed in the gradient's dtype (float32 for half precision), then float64: a float64
        # accumulation of float32 is ~6x slower on CPU
        for i, t in zip(copied, m):
            terms[i] = t.sum(dtype=torch.float32 if t.dtype in _LOW else None)
