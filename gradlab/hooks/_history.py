"""GradientMonitor's history: finished passes become compact records, read back as StepStats.

A pass's statistics arrive as a :class:`~gradlab.hooks._buffer.Pending` (possibly still being
copied from a GPU). :meth:`History.materialize` turns the ones that reached the host into
records: a finite step stays compact (its :class:`~gradlab.hooks._records.Layout`, shared by
every step with the same structure, plus one float64 array of the raw rows of
:data:`~gradlab.hooks._table.RAW`), a step with a NaN/Inf is expanded at once and its source
traced. :meth:`History.expand` builds the :class:`StepStats` of a record when it is read.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import torch

from gradlab.hooks._buffer import Pending
from gradlab.hooks._records import Compact, Layout, NonfiniteSource, StepStats
from gradlab.hooks._stats import ROWS
from gradlab.hooks._table import row, summarise
from gradlab.hooks._trace import find_source

__all__ = ["History", "HistoryView"]

_KIND = operator.attrgetter("kind")
_NAME = operator.attrgetter("name")
_MAX_LAYOUTS = 256  # distinct step structures remembered (shared between steps)
_SUM_SQ, _MAX_ABS, _NUMEL = row("sum_sq"), row("max_abs"), row("numel")


class History:
    """Records of the last ``maxlen`` steps, the step count and the first NaN source."""

    def __init__(
        self, maxlen: int | None, order: dict[str, int], vanishing: float, exploding: float
    ) -> None:
        self.records: deque[Compact | StepStats] = deque(maxlen=maxlen)
        self.pending: list[Pending] = []
        self.count = 0  # backward passes recorded
        self.source: NonfiniteSource | None = None
        self.order = order  # forward order of the monitored names
        self.vanishing = vanishing
        self.exploding = exploding
        self._layouts: dict[tuple[tuple[int, ...], tuple[str, ...]], Layout] = {}
        # step -> its diagnostics (a StepDiagnostics), for the steps that computed any; entries
        # of steps that left ``records`` are dropped as records are added.
        self.extras: dict[int, Any] = {}

    def materialize(self, *, trace: bool, only_ready: bool = False) -> None:
        """Records from the passes whose statistics reached the host (no sync if ``only_ready``)."""
        while self.pending:
            p = self.pending[0]
            if p.event is not None:
                if only_ready and not p.event.query():
                    return
                p.event.synchronize()
            self.pending.pop(0)
            vals = np.empty((len(_ROWS_ALL), len(p.slots)))
            vals[:ROWS, p.columns] = p.stats.numpy()
            vals[_NUMEL] = p.numels
            scale = 1.0
            if p.scale is not None:
                scale = float(p.scale.cpu() if isinstance(p.scale, torch.Tensor) else p.scale)
                vals[_SUM_SQ] /= scale * scale
                vals[_SUM_SQ + 1 : ROWS] /= scale  # L1, max |g|
            if np.isfinite(vals[_MAX_ABS]).all():
                self.records.append(Compact(p.step, self._layout(p.slots), vals, scale))
                continue
            rec = self._summarise(p.step, p.slots, vals, scale)
            if p.scale is not None:  # GradScaler.step skips it: an overflow, nobody's fault
                rec = dataclasses.replace(rec, skipped=True)
            elif trace:
                rec = dataclasses.replace(
                    rec, source=find_source(p.step, p.slots, vals[_MAX_ABS].tolist())
                )
                if self.source is None:
                    self.source = rec.source
            self.records.append(rec)
        self._prune_extras()

    def _prune_extras(self) -> None:
        if self.extras and self.records and len(self.extras) > len(self.records):
            first = self.records[0].step
            for step in [s for s in self.extras if s < first]:
                del self.extras[step]

    def _layout(self, slots: list[Any]) -> Layout:
        key = (tuple(map(_KIND, slots)), tuple(map(_NAME, slots)))
        layout = self._layouts.get(key)
        if layout is None:
            layout = Layout(*key)
            if len(self._layouts) < _MAX_LAYOUTS:  # else a model whose structure keeps changing
                self._layouts[key] = layout
        return layout

    def _summarise(
        self, step: int, slots: Sequence[Any], vals: np.ndarray, scale: float
    ) -> StepStats:
        return summarise(
            step,
            slots,
            vals,
            order=self.order,
            vanishing=self.vanishing,
            exploding=self.exploding,
            scale=scale,
        )

    def expand(self, rec: Compact | StepStats) -> StepStats:
        """The StepStats of a record (diagnostics as floats, copied: later steps leave it be)."""
        if not isinstance(rec, StepStats):
            rec = self._summarise(rec.step, rec.layout.slots, rec.vals, rec.scale)
        extra = self.extras.get(rec.step)
        if extra is None:
            return rec
        total, by_module = extra.values()
        return dataclasses.replace(rec, diagnostics=total, diagnostics_by_module=by_module)


_ROWS_ALL = range(ROWS + 1)  # the hooks' rows and the element count


class HistoryView(Sequence[StepStats]):
    """Read-only view of a monitor's records; builds each StepStats when it is read."""

    __slots__ = ("_history",)

    def __init__(self, history: History) -> None:
        self._history = history

    def __len__(self) -> int:
        return len(self._history.records)

    @overload
    def __getitem__(self, i: int) -> StepStats: ...

    @overload
    def __getitem__(self, i: slice) -> list[StepStats]: ...

    def __getitem__(self, i: int | slice) -> StepStats | list[StepStats]:
        records = self._history.records
        expand = self._history.expand
        if isinstance(i, slice):
            return [expand(records[j]) for j in range(*i.indices(len(records)))]
        return expand(records[i])

    def __iter__(self) -> Iterator[StepStats]:
        expand = self._history.expand
        for rec in list(self._history.records):
            yield expand(rec)

    def __repr__(self) -> str:
        return f"<GradientMonitor history: {len(self)} steps>"
