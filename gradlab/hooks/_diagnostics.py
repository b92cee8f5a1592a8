"""Training diagnostics of GradientMonitor: one named row per diagnostic, in :data:`DIAGNOSTICS`.

Each row names the *ingredients* it needs and computes its value from the sums of those
ingredients over a group of parameters (all monitored parameters, or one module's). Every
ingredient is a sum over parameters of a per-parameter quantity, so one set of per-parameter
numbers per step gives the whole-model value and every module's. The monitor computes the union
of the ingredients its rows need, once per diagnostic step. Adding a diagnostic whose
ingredients exist: one row here.

Ingredients (per parameter tensor ``p``; ``theta_t`` are the parameters the backward pass of
step t ran at):

* ``update_sq``: ``||p after the optimizer step that follows the backward - p at the backward||^2``
  (the actual change, whatever the optimizer; measured when an optimizer's ``step()`` returns,
  and again when the next backward starts or the monitor exits);
* ``origin_sq``: ``||p_t - p_0||^2``, ``p_0`` at the first diagnostic step.

Whole-model ingredients (rows with ``per_module=False``): the per-sample losses' mean and
variance (:mod:`~gradlab.hooks._losses`) and alpha's observations (:mod:`~gradlab.hooks._alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradlab.hooks._alpha import ALPHA_NEEDS, alpha_from_observations
from gradlab.hooks._ddp import two_batch_noise_scale
from gradlab.hooks._engine import _task_id
from gradlab.hooks._stats import DistScratch, as_float64

__all__ = ["DIAGNOSTICS", "Diagnostic", "ParamTracker", "StepDiagnostics", "check_diagnostics"]

Group = Mapping[str, float]  # ingredient name -> its sum over the group's parameters


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic: its name, the ingredients it needs, and its value from their sums."""

    name: str
    needs: tuple[str, ...]
    compute: Callable[[Group], float]
    doc: str
    per_module: bool = True  # False: whole model only (its ingredients have no module split)


def _ddp_noise_scale(g: Group) -> float:
    small, big = g["ddp_small_sq"], g["ddp_big_sq"]
    s, g2 = two_batch_noise_scale(small, big, g["ddp_b_small"], g["ddp_b_big"])
    return s / g2


def _norm_test(g: Group) -> float:
    b, m2 = g["ps_b"], g["ps_mean_sq"]
    s = (g["ps_sum_norm_sq"] - b * m2) / (b - 1)
    return math.sqrt(s / (b * m2))


def _inner_product_test(g: Group) -> float:
    b, m2 = g["ps_b"], g["ps_mean_sq"]
    return math.sqrt((g["ps_sum_dot_sq"] - b * m2 * m2) / (b - 1) / (b * m2 * m2))


def _orthogonality_test(g: Group) -> float:
    b, m2 = g["ps_b"], g["ps_mean_sq"]
    return math.sqrt((g["ps_sum_norm_sq"] - g["ps_sum_dot_sq"] / m2) / (b - 1) / (b * m2))


def _sqrt(key: str) -> Callable[[Group], float]:
    return lambda g: math.sqrt(g[key])


#: Every diagnostic :class:`GradientMonitor` can compute (its ``diagnostics=`` argument), by
#: name: what it needs and how its value is formed (the guide's table has the formulas).
DIAGNOSTICS: dict[str, Diagnostic] = {
    d.name: d
    for d in (
        Diagnostic(
            "update_size",
            ("update_sq",),
            _sqrt("update_sq"),
            "||theta_t - theta_{t-1}||: how far the optimizer step after this backward moved "
            "the parameters (any optimizer: the actual change)",
        ),
        Diagnostic(
            "distance",
            ("origin_sq",),
            _sqrt("origin_sq"),
            "||theta_t - theta_0||: how far the parameters are from the first monitored step",
        ),
        Diagnostic(
            "noise_scale",
            ("ns_num", "ns_den"),
            lambda g: g["ns_num"] / g["ns_den"],
            "B_simple = S / (||m||^2 - S/B), S = 1/(B-1) sum_i ||g_i - m||^2: the batch size "
            "above which larger batches stop paying (McCandlish et al. 2018, Appendix A)",
        ),
        Diagnostic(
            "gsnr",
            ("gsnr_sum", "gsnr_numel"),
            lambda g: g["gsnr_sum"] / g["gsnr_numel"],
            "mean over entries j of m_j^2 / ((1/B) sum_i g_ij^2 - m_j^2 + eps): gradient "
            "signal-to-noise ratio (Liu et al. 2020; Cockpit's MeanGSNR)",
        ),
        Diagnostic(
            "norm_test",
            ("ps_b", "ps_sum_norm_sq", "ps_mean_sq"),
            _norm_test,
            "sqrt(S / (B ||m||^2)): the smallest theta the norm test passes with (Byrd et al. "
            "2012; Cockpit's NormTest)",
        ),
        Diagnostic(
            "inner_product_test",
            ("ps_b", "ps_sum_dot_sq", "ps_mean_sq"),
            _inner_product_test,
            "sqrt(1/(B-1) (sum_i (g_i.m)^2 - B ||m||^4) / (B ||m||^4)) (Bollapragada et al. "
            "2018; Cockpit's InnerTest)",
        ),
        Diagnostic(
            "orthogonality_test",
            ("ps_b", "ps_sum_norm_sq", "ps_sum_dot_sq", "ps_mean_sq"),
            _orthogonality_test,
            "sqrt(1/(B-1) (sum_i ||g_i||^2 - sum_i (g_i.m)^2/||m||^2) / (B ||m||^2)) "
            "(Bollapragada et al. 2018; Cockpit's OrthoTest)",
        ),
        Diagnostic(
            "ddp_noise_scale",
            ("ddp_small_sq", "ddp_big_sq", "ddp_b_small", "ddp_b_big"),
            _ddp_noise_scale,
            "B_simple = S / |G|^2 from each rank's local gradient (B_small samples) and the "
            "all-reduced one (B_big): McCandlish's two-batch estimator (DDP models only)",
            per_module=False,
        ),
        Diagnostic(
            "tic",
            ("tic_sum",),
            lambda g: g["tic_sum"],
            "sum_j v_j / (h_j + 1e-7), v_j = (1/B) sum_i g_ij^2, h the exact Hessian diagonal "
            "of the mean loss (from record_tic): Takeuchi's information criterion (Thomas et "
            "al. 2019; Cockpit's TICDiag)",
        ),
        Diagnostic(
            "tic_trace",
            ("tic_v", "tic_h"),
            lambda g: g["tic_v"] / (g["tic_h"] + 1e-7),
            "sum_j v_j / (sum_j h_j + 1e-7): the TIC with the Hessian's trace (Cockpit's TICTrace)",
        ),
        Diagnostic(
            "loss_mean",
            ("loss_mean",),
            lambda g: g["loss_mean"],
            "(1/B) sum_i l_i: the mean of the per-sample losses given to record_loss",
            per_module=False,
        ),
        Diagnostic(
            "loss_var",
            ("loss_var",),
            lambda g: g["loss_var"],
            "1/(B-1) sum_i (l_i - mean)^2: the unbiased variance of the per-sample losses "
            "given to record_loss",
            per_module=False,
        ),
        Diagnostic(
            "alpha",
            ALPHA_NEEDS,
            alpha_from_observations,
            "2 t / alpha_bar - 1: where the step landed on a noise-aware quadratic fit of the "
            "loss along the actual update (-1 stayed, 0 the minimum, 1 the other side; "
            "Mahsereci & Hennig 2017; Cockpit's Alpha); stored on step t once step t+1 ran",
            per_module=False,
        ),
    )
}


def check_diagnostics(fn: str, diagnostics: object) -> tuple[str, ...]:
    """The requested diagnostic names as a tuple, or a clear error."""
    if isinstance(diagnostics, str):
        raise TypeError(
            f"{fn}: diagnostics must be a tuple of names, got {diagnostics!r}. "
            f"Write diagnostics=({diagnostics!r},)"
        )
    try:
        names: tuple[object, ...] = tuple(diagnostics)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{fn}: diagnostics must be a tuple of names, got {diagnostics!r}. "
            f"Choose from {', '.join(map(repr, DIAGNOSTICS))}"
        ) from None
    for name in names:
        if not isinstance(name, str) or name not in DIAGNOSTICS:
            raise ValueError(
                f"{fn}: diagnostics holds an unknown name, got {name!r}. "
                f"Valid names: {', '.join(map(repr, DIAGNOSTICS))}"
            )
    return tuple(dict.fromkeys(str(n) for n in names))


class StepDiagnostics:
    """The per-group ingredient sums of one step (tensors until read) and the diagnostics."""

    __slots__ = ("_done", "_lazy", "_restored", "groups", "names", "sums")

    def __init__(self, names: tuple[str, ...], groups: Sequence[str]) -> None:
        self.names = names
        self.groups = groups  # module names; the sums have one entry per group, then the total
        self.sums: dict[str, Any] = {}  # ingredient -> (G + 1,) tensor or list of floats
        self._lazy: list[Callable[[], dict[str, float]]] = []  # whole-model ingredients
        self._done: tuple[dict[str, float], dict[str, dict[str, float]]] | None = None
        self._restored = False  # values from a checkpoint: later ingredients are ignored

    def set(self, ingredient: str, per_group: torch.Tensor) -> None:
        """Store an ingredient: a (G,) tensor of per-group sums (the total is added)."""
        self.sums[ingredient] = torch.cat([per_group, per_group.sum().view(1)])
        self._done = None

    def set_all(self, ingredient: str, values: torch.Tensor) -> None:
        """Store an ingredient given per group and for the whole model: a (G + 1,) tensor."""
        self.sums[ingredient] = values
        self._done = None

    def set_total(self, ingredient: str, value: torch.Tensor) -> None:
        """Store a whole-model ingredient (a 0-dim tensor); its per-group entries are NaN."""
        if self._restored:
            return
        value = value.detach().to(torch.float64).reshape(1)
        nan = torch.full((len(self.groups),), math.nan, dtype=torch.float64, device=value.device)
        self.sums[ingredient] = torch.cat([nan, value])
        self._done = None

    def set_total_later(self, ingredients: Callable[[], dict[str, float]]) -> None:
        """Whole-model ingredients that are known once ``ingredients()`` can run (at a read)."""
        self._lazy.append(ingredients)
        self._done = None

    def values(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(whole-model values, name -> module -> value); NaN where an ingredient is missing."""
        if self._done is None:
            sums = {k: [float(x) for x in v.tolist()] for k, v in self.sums.items()}
            for lazy in self._lazy:
                for k, v in lazy().items():
                    sums[k] = [math.nan] * len(self.groups) + [v]
            total: dict[str, float] = {}
            by_module: dict[str, dict[str, float]] = {}
            for name in self.names:
                row = DIAGNOSTICS[name]
                if not all(k in sums for k in row.needs):
                    total[name] = math.nan
                    if row.per_module:
                        by_module[name] = {m: math.nan for m in self.groups}
                    continue
                total[name] = _safe(row.compute, {k: sums[k][-1] for k in row.needs})
                if not row.per_module:
                    continue
                by_module[name] = {
                    m: _safe(row.compute, {k: sums[k][i] for k in row.needs})
                    for i, m in enumerate(self.groups)
                }
            self._done = (total, by_module)
        total, by_module = self._done
        return dict(total), {k: dict(v) for k, v in by_module.items()}

    @classmethod
    def restored(
        cls, total: dict[str, float], by_module: dict[str, dict[str, float]]
    ) -> StepDiagnostics:
        """One from saved values (a checkpoint)."""
        out = cls(tuple(total), tuple(next(iter(by_module.values()), {})))
        out._restored = True
        out._done = (
            {k: float(v) for k, v in total.items()},
            {k: {m: float(x) for m, x in v.items()} for k, v in by_module.items()},
        )
        return out


def _safe(fn: Callable[[Group], float], group: Group) -> float:
    try:
        return float(fn(group))
    except (ValueError, ZeroDivisionError):  # sqrt of a negative estimate, 0/0
        return math.nan


class ParamTracker:
    """The parameter-change ingredients: ``update_sq`` and ``origin_sq`` per group.

    ``params`` are the monitored trainable parameters (held weakly by the caller; passed in on
    each call), ``owner`` the group index of each. A snapshot of the parameters is taken at the
    end of each diagnostic step's backward (``update_size``), and one at the first such step
    (``distance``).

    Each parameter is read once per measurement, in one loop that does everything that needs
    it while it is in cache (:meth:`DistScratch.moved`). A measurement at the start of a
    backward pass (no optimizer hook fired, as in a loop that steps by hand) also refreshes
    the snapshot and takes the distance: the pass's end then skips both if no parameter was
    replaced or modified in place (versions, data pointers) within the same pass, so a step
    reads the parameters once instead of three times. A refresh outside the pass (after the
    optimizer's step) would not be exact: ``p.data`` can change without a version bump
    between then and the next backward.
    """

    def __init__(self, owner: Sequence[int], groups: int, update: bool, origin: bool) -> None:
        self._owner = torch.tensor(list(owner), dtype=torch.long)
        self._groups = groups
        self.update = update
        self.origin = origin
        self.theta0: list[torch.Tensor] | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._target: StepDiagnostics | None = None
        self._versions: list[int] = []  # parameter versions at the last update measurement
        self._buffer: list[torch.Tensor] | None = None  # the snapshot, kept from step to step
        self._scratch = DistScratch()
        # a snapshot refreshed by the last measurement in a pass: (pass id, versions, data
        # pointers, theta0 it was measured against, the distance); whether refreshing pays
        # (the last diagnostic step's pass also had the final measurement: so with every=1,
        # not with every=k), and the pass of the last final measurement
        self._refresh: tuple[int, list[int], list[int], Any, torch.Tensor | None] | None = None
        self._refresh_pays = True
        self._final_task = -1

    def _per_group(self, sq: list[Any], device: Any) -> torch.Tensor:
        out = torch.zeros(self._groups, dtype=torch.float64, device=device)
        return out.index_add_(0, self._owner.to(device), as_float64(sq, device))

    def _moved(
        self,
        params: list[torch.Tensor],
        snap: list[torch.Tensor] | None,
        origin: list[torch.Tensor] | None,
        measure: bool,
        copy: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per group ``||p - snap||^2`` (if ``measure``) and ``||p - origin||^2`` (if given);
        then ``snap`` holds the parameters if ``copy``. CPU float32/float64 (with SciPy): one
        loop per tensor (:meth:`DistScratch.moved`); else torch ops per list."""
        with torch.no_grad():
            ps = [p.detach() for p in params]
            device = ps[0].device
            n = len(ps)
            snaps: list[Any] = [None] * n if snap is None else snap
            origins: list[Any] = [None] * n if origin is None else origin
            moved = self._scratch.moved
            # copied in the loop only after a measurement (the difference is formed in the
            # snapshot itself); a copy alone is faster as one foreach op after it
            fused = copy and measure
            found = (
                [moved(p, s, o, measure, fused) for p, s, o in zip(ps, snaps, origins)]
                if device.type == "cpu"
                else [None]
            )
            if all(f is not None for f in found):
                update = [f[0] for f in found]  # type: ignore[index]
                dist = [f[1] for f in found]  # type: ignore[index]
                if copy and not fused:
                    torch._foreach_copy_(snaps, ps)
            else:  # not all by BLAS (nothing done for those): all by torch ops
                sq = torch.Tensor.square
                update = (
                    [sq(torch.dist(p, s).double()) for p, s in zip(ps, snaps)] if measure else []
                )
                dist = (
                    [sq(torch.dist(p, o).double()) for p, o in zip(ps, origins)] if origin else []
                )
                if copy:
                    torch._foreach_copy_(snaps, ps)
            return (
                self._per_group(update, device) if measure else None,
                None if origin is None else self._per_group(dist, device),
            )

    @staticmethod
    def _state(params: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        return [p._version for p in params], [p.data_ptr() for p in params]

    def end_of_backward(self, params: list[torch.Tensor], diag: StepDiagnostics) -> None:
        """A diagnostic step's backward finished: distance now, snapshot for the update."""
        if not params:
            return
        refresh, self._refresh = self._refresh, None
        task = _task_id()
        self._refresh_pays = self._final_task == task != -1
        if refresh is not None:
            fresh = (
                refresh[0] == task != -1
                and refresh[3] is self.theta0
                and (refresh[1], refresh[2]) == self._state(params)
            )
            if fresh and self.update and self._buffer is not None:
                dist = refresh[4]
                if dist is not None:
                    diag.set("origin_sq", dist)
                self._snapshot = self._buffer
                self._target = diag
                self._versions = []
                return
        with torch.no_grad():
            origin = None
            if self.origin:
                if self.theta0 is None:
                    self.theta0 = [p.detach().clone() for p in params]
                origin = self.theta0
            snap = None
            if self.update:
                snap = self._buffer
                if snap is None or any(
                    b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                    for b, p in zip(snap, params)
                ):
                    snap = self._buffer = [torch.empty_like(p) for p in params]
            if snap is None and origin is None:
                return
            _, dist = self._moved(params, snap, origin, False, snap is not None)
            if dist is not None:
                diag.set("origin_sq", dist)
            if snap is not None:
                self._snapshot = snap
                self._target = diag
                self._versions = []

    def measure_update(self, params: list[torch.Tensor], final: bool) -> None:
        """The parameters may have moved (an optimizer stepped; ``final``: the step is over).

        Measured again only if a parameter was modified since the last measurement (its
        in-place version counter moved): the usual final call after an optimizer hook is free.
        A final measurement inside a backward pass also refreshes the snapshot for that pass's
        end (see the class).
        """
        task = _task_id()
        if final:
            self._final_task = task
        snap, target = self._snapshot, self._target
        if snap is None or target is None:
            return
        versions = [p._version for p in params]
        if versions != self._versions:
            refresh = final and task != -1 and self._refresh_pays
            origin = self.theta0 if refresh and self.origin else None
            update, dist = self._moved(params, snap, origin, True, refresh)
            assert update is not None
            target.set("update_sq", update)
            self._versions = versions
            if refresh:
                state = self._state(params)
                self._refresh = (task, state[0], state[1], self.theta0, dist)
        if final:
            self._snapshot = self._target = None
            self._versions = []
