"""What GradientMonitor records: per-step statistics, their compact form, checkpoints, scalars.

A finite step is kept as a :class:`Compact` record (a shared :class:`Layout` plus one float64
array) and expanded to a :class:`StepStats` when read; a step with a NaN/Inf is kept expanded.
:func:`records_to_state` / :func:`records_from_state` turn the records into plain containers and
tensors for ``GradientMonitor.state_dict`` and back; :func:`step_scalars` flattens a step for
loggers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from gradlab._validate import message

__all__ = [
    "STATE_VERSION",
    "Compact",
    "LayerStats",
    "Layout",
    "NonfiniteSource",
    "StepStats",
    "check_state",
    "records_from_state",
    "records_to_state",
    "step_scalars",
]

STATE_VERSION = 2  # of GradientMonitor.state_dict(); version 1 (no diagnostics, names) is read too
_READS = (1, 2)
_STATE_KEYS = (
    "version",
    "steps",
    "vanishing",
    "exploding",
    "nonfinite_source",
    "layouts",
    "history",
)


class LayerStats(NamedTuple):
    """Statistics of one gradient: L2 norm, largest and mean absolute entry.

    The values of the ``outputs`` and ``params`` dicts of a :class:`StepStats`.

    Attributes:
        norm: the L2 norm of the gradient (of all its entries).
        max_abs: its largest absolute entry.
        mean_abs: the mean of its absolute entries.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> with GradientMonitor(net) as monitor:
        ...     net(torch.ones(4, 2)).sum().backward()
        >>> monitor.history[0].params["2.bias"]  # d(sum of 4 outputs)/d bias = 4
        LayerStats(norm=4.0, max_abs=4.0, mean_abs=4.0)
        >>> stats, g = monitor.history[0].params["2.weight"], net[2].weight.grad
        >>> written_out = (g.norm(), g.abs().max(), g.abs().mean())
        >>> all(abs(a - b.item()) < 1e-6 for a, b in zip(stats, written_out))
        True
    """

    norm: float
    max_abs: float
    mean_abs: float


class NonfiniteSource(NamedTuple):
    """Where a NaN/Inf gradient came from.

    ``origin == "backward"``: ``module``'s backward received finite output gradients and produced
    a non-finite input or parameter gradient: the source. ``origin == "incoming"``: the gradient
    already arrived non-finite at the output of ``module`` (the first monitored module in backward
    order), so it was made by the loss or by code outside every monitored module.

    Attributes:
        module: the module's name in the model (``named_modules()``).
        step: the backward pass (the monitor's step index) in which it happened.
        origin: ``"backward"`` or ``"incoming"``, as above.

    Example:
        A module whose backward turns a finite gradient into ``inf`` (the square root at 0):

        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor
        >>> class Sqrt(nn.Module):
        ...     def forward(self, x):
        ...         return x.sqrt()
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), Sqrt(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(-1.0)  # ReLU gives 0, whose square root has slope inf
        >>> with GradientMonitor(net) as monitor:
        ...     net(torch.ones(4, 2)).sum().backward()
        >>> monitor.history[0].source
        NonfiniteSource(module='2', step=0, origin='backward')

        A NaN made by the loss reaches the last module already non-finite:

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> with GradientMonitor(net) as monitor:
        ...     (net(torch.ones(4, 2)) * float("nan")).sum().backward()
        >>> monitor.history[0].source, monitor.first_nonfinite
        (NonfiniteSource(module='2', step=0, origin='incoming'), '2')
    """

    module: str
    step: int
    origin: Literal["backward", "incoming"]


@dataclass(frozen=True)
class StepStats:
    """What :class:`GradientMonitor` recorded for one backward pass.

    Attributes:
        step: index of the backward pass (0 = the first one seen by the monitor).
        outputs: module name -> statistics of the gradient w.r.t. its output(s), over every call
            and every output tensor of that module in the pass (norm of the concatenation).
        params: parameter name -> statistics of its ``.grad`` right after this pass accumulated
            into it.
        vanishing: names (modules and parameters) whose gradient L2 norm is below the monitor's
            ``vanishing`` threshold.
        exploding: names whose gradient L2 norm is above ``exploding`` (finite entries, possibly
            an overflowing norm).
        nonfinite: names whose gradient holds a NaN or Inf.
        source: where the non-finite values came from, or ``None`` when everything is finite
            (and for a step the scaler skips).
        scale: the loss scale the statistics were divided by (``1.0`` without a ``scaler``).
        skipped: a step with a ``scaler`` whose gradients hold a NaN/Inf, which
            ``GradScaler.step`` skips (an overflow of the scaled loss, not a layer's fault: no
            ``source`` is named).
        diagnostics: diagnostic name -> its value over all monitored parameters, for a step
            on which the monitor's ``diagnostics`` were computed (empty otherwise); a value not
            known yet (``update_size`` before the optimizer step) is NaN.
        diagnostics_by_module: diagnostic name -> {module name -> value}, the same per
            monitored module (over that module's parameters).

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> with GradientMonitor(net, exploding=3.0) as monitor:
        ...     net(torch.ones(4, 2)).sum().backward()
        >>> step = monitor.history[0]  # one StepStats per backward pass
        >>> step.step, sorted(step.outputs), sorted(step.params)
        (0, ['0', '1', '2'], ['0.bias', '0.weight', '2.bias', '2.weight'])
        >>> {name: round(s.norm, 4) for name, s in step.params.items()}
        {'0.weight': 1.2373, '0.bias': 0.8749, '2.weight': 2.4799, '2.bias': 4.0}
        >>> step.vanishing, step.exploding, step.nonfinite, step.source  # norm 4 > 3
        ((), ('2.bias',), (), None)
        >>> step.scale, step.skipped, step.diagnostics  # no scaler, no diagnostics asked for
        (1.0, False, {})
    """

    step: int
    outputs: dict[str, LayerStats]
    params: dict[str, LayerStats]
    vanishing: tuple[str, ...]
    exploding: tuple[str, ...]
    nonfinite: tuple[str, ...]
    source: NonfiniteSource | None
    scale: float = 1.0
    skipped: bool = False
    diagnostics: dict[str, float] = field(default_factory=dict)
    diagnostics_by_module: dict[str, dict[str, float]] = field(default_factory=dict)

    def __repr__(self) -> str:
        def group(stats: dict[str, LayerStats], what: str) -> str:
            norms = [s.norm for s in stats.values()]
            if not norms:
                return f"0 {what}"
            return f"{len(norms)} {what}, norm {min(norms):.3g}..{max(norms):.3g}"

        def names(t: tuple[str, ...]) -> str:
            shown = ", ".join(map(repr, t[:3]))
            return f"({shown}{', ...' if len(t) > 3 else ''}{',' if len(t) == 1 else ''})"

        extra = f", scale={self.scale:g}, skipped={self.skipped}" if self.scale != 1.0 else ""
        if self.diagnostics:
            extra += (
                ", diagnostics={"
                + ", ".join(f"{k!r}: {v:.4g}" for k, v in self.diagnostics.items())
                + "}"
            )
        return (
            f"StepStats(step={self.step}, outputs=<{group(self.outputs, 'modules')}>, "
            f"params=<{group(self.params, 'parameters')}>, vanishing={names(self.vanishing)}, "
            f"exploding={names(self.exploding)}, nonfinite={names(self.nonfinite)}, "
            f"source={self.source!r}{extra})"
        )


class Layout:
    """The kind and name of each record of a step: shared by the steps with that structure."""

    __slots__ = ("slots",)

    def __init__(self, kinds: tuple[int, ...], names: tuple[str, ...]) -> None:
        self.slots = tuple(Rec(k, n) for k, n in zip(kinds, names))


class Rec(NamedTuple):
    kind: int
    name: str


class Compact:
    """A finite step: its layout and (sum of squares, L1, max |g|, numel) per record."""

    __slots__ = ("layout", "scale", "step", "vals")

    def __init__(self, step: int, layout: Layout, vals: np.ndarray, scale: float = 1.0) -> None:
        self.step = step
        self.layout = layout
        self.vals = vals
        self.scale = scale


def records_to_state(
    records: deque[Compact | StepStats],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(layouts, history) of a state dict: plain containers and float64 tensors (copies)."""
    index_of: dict[int, int] = {}
    layouts: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    for rec in records:
        if isinstance(rec, StepStats):
            history.append(step_to_dict(rec))
            continue
        index = index_of.get(id(rec.layout))
        if index is None:
            index = index_of[id(rec.layout)] = len(layouts)
            slots = rec.layout.slots
            layouts.append({"kinds": [r.kind for r in slots], "names": [r.name for r in slots]})
        history.append(
            {
                "step": rec.step,
                "layout": index,
                "vals": torch.tensor(rec.vals, dtype=torch.float64),
                "scale": rec.scale,
            }
        )
    return layouts, history


def records_from_state(state: dict[str, Any], maxlen: int | None) -> deque[Compact | StepStats]:
    """The records saved by :func:`records_to_state` (the last ``maxlen``); copies, not views."""
    layouts = [Layout(tuple(d["kinds"]), tuple(d["names"])) for d in state["layouts"]]
    records: deque[Compact | StepStats] = deque(maxlen=maxlen)
    for d in state["history"]:
        if "layout" in d:
            vals = d["vals"].detach().to(torch.float64).numpy().copy()
            records.append(Compact(int(d["step"]), layouts[d["layout"]], vals, float(d["scale"])))
        else:
            records.append(step_from_dict(d))
    return records


def check_state(fn: str, state_dict: object) -> None:
    """Raise if ``state_dict`` is not a GradientMonitor state dict of this version."""
    if not isinstance(state_dict, dict):
        raise TypeError(
            message(
                fn,
                "state_dict",
                "a dict from GradientMonitor.state_dict()",
                state_dict,
                "Pass what monitor.state_dict() returned (or torch.load gave back)",
            )
        )
    missing = [k for k in _STATE_KEYS if k not in state_dict]
    if missing:
        raise ValueError(
            f"{fn}: state_dict lacks {', '.join(map(repr, missing))}; pass the dict "
            "returned by GradientMonitor.state_dict()"
        )
    if state_dict["version"] not in _READS:
        raise ValueError(
            f"{fn}: state_dict has version {state_dict['version']!r}, this gradlab reads "
            f"versions {', '.join(map(str, _READS))}"
        )


def step_scalars(rec: StepStats, *, root: str, total: bool, scaler: bool) -> dict[str, float]:
    """The flat ``{key: float}`` dict of ``GradientMonitor.scalars`` for one step."""
    out: dict[str, float] = {}
    for kind, stats in (("output", rec.outputs), ("param", rec.params)):
        for name, st in stats.items():
            prefix = f"grad/{kind}/{name or root}/"
            out[prefix + "norm"] = st.norm
            out[prefix + "max_abs"] = st.max_abs
            out[prefix + "mean_abs"] = st.mean_abs
    if total:
        out["grad/total_norm"] = math.sqrt(math.fsum(st.norm**2 for st in rec.params.values()))
    out["grad/vanishing"] = float(len(rec.vanishing))
    out["grad/exploding"] = float(len(rec.exploding))
    out["grad/nonfinite"] = float(len(rec.nonfinite))
    if scaler:
        out["grad/scale"] = rec.scale
        out["grad/skipped"] = float(rec.skipped)
    for name, value in rec.diagnostics.items():
        out[f"diagnostics/{name}"] = value
    for name, by_module in rec.diagnostics_by_module.items():
        for module, value in by_module.items():
            out[f"diagnostics/{name}/{module or root}"] = value
    return out


def step_to_dict(rec: StepStats) -> dict[str, Any]:
    return {
        "step": rec.step,
        "outputs": {n: list(s) for n, s in rec.outputs.items()},
        "params": {n: list(s) for n, s in rec.params.items()},
        "vanishing": list(rec.vanishing),
        "exploding": list(rec.exploding),
        "nonfinite": list(rec.nonfinite),
        "source": None if rec.source is None else list(rec.source),
        "scale": rec.scale,
        "skipped": rec.skipped,
    }


def diagnostics_to_dict(rec: StepStats) -> dict[str, Any]:
    return {
        "diagnostics": dict(rec.diagnostics),
        "diagnostics_by_module": {k: dict(v) for k, v in rec.diagnostics_by_module.items()},
    }


def step_from_dict(d: dict[str, Any]) -> StepStats:
    src = d["source"]
    return StepStats(
        step=int(d["step"]),
        outputs={n: LayerStats(*map(float, v)) for n, v in d["outputs"].items()},
        params={n: LayerStats(*map(float, v)) for n, v in d["params"].items()},
        vanishing=tuple(d["vanishing"]),
        exploding=tuple(d["exploding"]),
        nonfinite=tuple(d["nonfinite"]),
        source=None if src is None else NonfiniteSource(str(src[0]), int(src[1]), src[2]),
        scale=float(d["scale"]),
        skipped=bool(d["skipped"]),
    )
