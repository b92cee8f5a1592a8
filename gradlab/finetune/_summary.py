"""parameter_summary: per-module trainable / frozen counts and sizes, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import gradlab._validate as v
from gradlab.finetune._batchnorm import is_pinned
from gradlab.finetune._select import check_model
from gradlab.finetune._wrappers import unwrap

__all__ = ["ParameterSummary", "SummaryRow", "parameter_summary"]


@dataclass(frozen=True)
class SummaryRow:
    """One module's line: element counts and bytes of its parameters (its whole subtree).

    Attributes:
        name: dotted module name (``""`` for the model itself, shown as ``total``).
        type: class name.
        depth: number of dots + 1 (0 for the model).
        trainable: number of trainable parameter elements.
        frozen: number of frozen parameter elements.
        trainable_bytes: bytes of the trainable parameters.
        frozen_bytes: bytes of the frozen parameters.
        note: ``"eval-pinned"`` for a BatchNorm kept in eval mode by ``freeze``,
            ``"frozen-bn"`` for a FrozenBatchNorm, else ``""``.
    """

    name: str
    type: str
    depth: int
    trainable: int
    frozen: int
    trainable_bytes: int
    frozen_bytes: int
    note: str


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ParameterSummary:
    """What :func:`parameter_summary` returns: rows plus the model's total.

    ``str(summary)`` is an aligned table; ``summary.rows`` the structured rows (module rows in
    ``named_modules`` order), ``summary.total`` the whole model (tied parameters counted once).
    """

    rows: tuple[SummaryRow, ...]
    total: SummaryRow

    @property
    def trainable(self) -> int:
        """Trainable parameter elements in the whole model."""
        return self.total.trainable

    @property
    def frozen(self) -> int:
        """Frozen parameter elements in the whole model."""
        return self.total.frozen

    def __str__(self) -> str:
        header = ("module", "type", "trainable", "frozen", "trainable size", "frozen size", "note")
        lines = [
            (
                "  " * max(r.depth - 1, 0) + (r.name or "total"),
                r.type,
                f"{r.trainable:,}",
                f"{r.frozen:,}",
                _size(r.trainable_bytes),
                _size(r.frozen_bytes),
                r.note,
            )
            for r in (*self.rows, self.total)
        ]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        left = (True, True, False, False, False, False, True)

        def fmt(cells: tuple[str, ...]) -> str:
            parts = [c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(cells, widths, left)]
            return "  ".join(parts).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


def _row(name: str, module: nn.Module) -> SummaryRow:
    trainable = frozen = trainable_bytes = frozen_bytes = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable, trainable_bytes = trainable + p.numel(), trainable_bytes + size
        else:
            frozen, frozen_bytes = frozen + p.numel(), frozen_bytes + size
    note = "eval-pinned" if is_pinned(module) else ""
    if "_gradlab_original" in module.__dict__:
        note = "frozen-bn"
    depth = 0 if not name else name.count(".") + 1
    return SummaryRow(
        name, type(module).__name__, depth, trainable, frozen, trainable_bytes, frozen_bytes, note
    )


def parameter_summary(model: nn.Module, *, max_depth: int | None = 1) -> ParameterSummary:
    """Per-module trainable and frozen parameter counts and sizes.

    Each row covers a module's whole subtree; a parameter shared by two modules is counted in
    each of their rows but once in the total. Rows list the modules down to ``max_depth`` levels
    below the model (``None``: every module), in ``named_modules`` order.

    Args:
        model: the network.
        max_depth: deepest level listed (1: the model's children); None lists every module.

    Returns:
        A :class:`ParameterSummary`: ``print`` it for a table, read ``.rows`` / ``.total`` for
        numbers.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``max_depth`` is not None or an int >= 1.

    Example:
        >>> from torch import nn
        >>> from gradlab.finetune import freeze
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> freeze(net, "0", "1")
        >>> print(parameter_summary(net))
        module  type         trainable  frozen  trainable size  frozen size  note
        -------------------------------------------------------------------------
        0       Linear               0      40             0 B      160 B
        1       BatchNorm1d          0      16             0 B       64 B  eval-pinned
        2       Linear              18       0            72 B          0 B
        -------------------------------------------------------------------------
        total   Sequential          18      56            72 B      224 B
    """
    check_model("parameter_summary", model)
    if max_depth is not None:
        v.check_int(
            "parameter_summary",
            "max_depth",
            max_depth,
            minimum=1,
            fix="Pass an int >= 1, or None for every depth",
        )
    net, _ = unwrap(model)
    rows = tuple(
        _row(name, module)
        for name, module in net.named_modules()
        if name and (max_depth is None or name.count(".") + 1 <= max_depth)
    )
    return ParameterSummary(rows=rows, total=_row("", net))
