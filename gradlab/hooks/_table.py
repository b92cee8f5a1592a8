"""The table of per-gradient statistics GradientMonitor records: one named row per statistic.

Each step stores, per hooked gradient, the raw rows of :data:`RAW` (what the hooks compute while
the gradient is in cache); a module called several times, or with several outputs, has its raw
rows combined by each row's rule. Every statistic in :data:`STATISTICS` is one row naming the raw
rows it needs and a function of them; :class:`~gradlab.hooks._records.LayerStats` has exactly
these fields, in this order, and ``scalars()`` keys end in these names. Adding a statistic that
the raw rows determine: one row here (and its field in ``LayerStats``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab.hooks._records import LayerStats, StepStats
from gradlab.hooks._trace import OUT, PARAM

__all__ = ["RAW", "STATISTICS", "Raw", "Statistic", "row", "summarise"]


def _nanmax(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass(frozen=True)
class Raw:
    """One raw row of a step's array: a number per hooked gradient, and how calls add up."""

    name: str
    combine: Callable[[float, float], float]


# The first ROWS (gradlab.hooks._stats) come from the hooks' reductions, in their order; the
# element count is known without touching the gradient.
RAW: tuple[Raw, ...] = (
    Raw("sum_sq", float.__add__),  # sum(g**2): squared norms of several calls add exactly
    Raw("l1", float.__add__),  # sum |g|
    Raw("max_abs", _nanmax),  # max |g|: NaN/Inf exactly when g holds one (the detector)
    Raw("numel", float.__add__),
)
_INDEX = {r.name: i for i, r in enumerate(RAW)}


def row(name: str) -> int:
    """The index of raw row ``name`` in a step's array."""
    return _INDEX[name]


@dataclass(frozen=True)
class Statistic:
    """One statistic of a gradient: its name, the raw rows it needs, and how to compute it."""

    name: str
    needs: tuple[str, ...]
    compute: Callable[..., float]


STATISTICS: tuple[Statistic, ...] = (
    Statistic("norm", ("sum_sq",), math.sqrt),
    Statistic("max_abs", ("max_abs",), float),
    Statistic("mean_abs", ("l1", "numel"), lambda total, n: total / n if n else 0.0),
)
if tuple(s.name for s in STATISTICS) != LayerStats._fields:  # pragma: no cover - a coding error
    raise AssertionError("STATISTICS and LayerStats must name the same fields in the same order")
_NEEDS = tuple(tuple(_INDEX[n] for n in s.needs) for s in STATISTICS)


def _layer(raw: Sequence[float]) -> LayerStats:
    return LayerStats(*(s.compute(*(raw[i] for i in idx)) for s, idx in zip(STATISTICS, _NEEDS)))


def summarise(
    step: int,
    slots: Sequence[Any],
    vals: np.ndarray,
    *,
    order: dict[str, int],
    vanishing: float,
    exploding: float,
    scale: float = 1.0,
) -> StepStats:
    """StepStats (no source, no diagnostics) of a step: ``vals[r, i]`` is raw row r of slot i.

    ``slots`` have ``.kind`` and ``.name``; module outputs of the same name are combined, input
    gradients (recorded for NaN tracing only) are left out; names are sorted by ``order``.
    """
    columns = vals.T.tolist()
    outs: dict[str, list[float]] = {}
    params: dict[str, LayerStats] = {}
    for s, raw in zip(slots, columns):
        if s.kind == OUT:
            acc = outs.get(s.name)
            if acc is None:
                outs[s.name] = raw
            else:
                outs[s.name] = [r.combine(a, b) for r, a, b in zip(RAW, acc, raw)]
        elif s.kind == PARAM:
            params[s.name] = _layer(raw)
    rank = order.get
    outputs = {n: _layer(outs[n]) for n in sorted(outs, key=lambda n: rank(n, 0))}
    params = {n: params[n] for n in sorted(params, key=lambda n: rank(n, 0))}
    named = list(outputs.items()) + list(params.items())
    return StepStats(
        step=step,
        outputs=outputs,
        params=params,
        vanishing=tuple(n for n, s in named if s.norm < vanishing),
        exploding=tuple(n for n, s in named if math.isfinite(s.max_abs) and s.norm > exploding),
        nonfinite=tuple(n for n, s in named if not math.isfinite(s.max_abs)),
        source=None,
        scale=scale,
    )
