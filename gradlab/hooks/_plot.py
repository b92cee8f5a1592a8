"""plot_grad_flow and grad_flow_table: per-layer gradient norms as a figure or a terminal table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from gradlab._validate import check_bool, check_choice, check_int, message
from gradlab.hooks._monitor import GradientMonitor, LayerStats, StepStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["grad_flow_table", "plot_grad_flow"]

Kind = Literal["parameters", "outputs"]
_KINDS = ("parameters", "outputs")
_VANISHING = 1e-7  # GradientMonitor's defaults, used for a bare model
_EXPLODING = 1e3


def _check(fn: str, source: object, kind: str) -> None:
    if not isinstance(source, (GradientMonitor, nn.Module)):
        raise TypeError(
            message(
                fn,
                "source",
                "a GradientMonitor or a torch.nn.Module",
                source,
                "Pass the monitor you trained with, or the model after loss.backward()",
            )
        )
    check_choice(fn, "kind", kind, _KINDS)
    if isinstance(source, nn.Module) and kind == "outputs":
        raise ValueError(
            f"{fn}: kind='outputs' needs a GradientMonitor (a model keeps no output "
            "gradients); pass the monitor, or use kind='parameters'"
        )


def _model_rows(model: nn.Module) -> list[tuple[str, LayerStats | None]]:
    rows: list[tuple[str, LayerStats | None]] = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is None or g.numel() == 0:
            rows.append((name, None))  # frozen, unused, or before the first backward
            continue
        g = g.detach()
        a = g.abs()
        vals = torch.stack([torch.linalg.vector_norm(g), a.amax(), a.mean()]).tolist()
        rows.append((name, LayerStats(*vals)))
    return rows


def _step(fn: str, monitor: GradientMonitor, step: int) -> StepStats:
    check_int(fn, "step", step, fix="An index into monitor.history: -1 for the last step")
    history = monitor.history
    if not history:
        raise ValueError(
            f"{fn}: the monitor has recorded no backward pass yet; run loss.backward() "
            "inside `with GradientMonitor(model) as monitor:` first"
        )
    if not -len(history) <= step < len(history):
        raise ValueError(
            f"{fn}: step={step} is out of range for {len(history)} recorded steps; "
            f"use -1 (the last) or 0..{len(history) - 1}"
        )
    return history[step]


def _rows(
    fn: str, source: GradientMonitor | nn.Module, kind: str, step: int
) -> tuple[list[tuple[str, LayerStats | None]], float, float, str]:
    _check(fn, source, kind)
    if isinstance(source, nn.Module):
        return _model_rows(source), _VANISHING, _EXPLODING, "current .grad of each parameter"
    rec = _step(fn, source, step)
    stats = rec.params if kind == "parameters" else rec.outputs
    what = "parameter gradients" if kind == "parameters" else "output gradients"
    return list(stats.items()), source.vanishing, source.exploding, f"{what}, step {rec.step}"


def _flag(s: LayerStats | None, vanishing: float, exploding: float) -> str:
    if s is None:
        return "no grad"
    if not math.isfinite(s.max_abs):
        return "NaN/Inf"
    if s.norm < vanishing:
        return "vanishing"
    if s.norm > exploding:
        return "exploding"
    return ""


def grad_flow_table(
    source: GradientMonitor | nn.Module, *, kind: Kind = "parameters", step: int = -1
) -> str:
    """Per-layer gradient statistics as a plain-text table (for terminals and logs).

    Args:
        source: a :class:`GradientMonitor` (one recorded step is shown) or a model (the current
            ``.grad`` of every parameter, biases included; ``grad is None`` is shown as
            ``no grad``, not skipped).
        kind: ``"parameters"`` or ``"outputs"`` (output gradients; monitor only).
        step: which recorded step of a monitor (default: the last).

    Returns:
        The table: name, L2 norm, ``max |g|``, ``mean |g|``, and a flag (``vanishing``,
        ``exploding``, ``NaN/Inf``, ``no grad``) with the monitor's thresholds (defaults for a
        model).

    Raises:
        TypeError: ``source`` is neither a monitor nor a module.
        ValueError: unknown ``kind``, ``kind="outputs"`` for a model, an empty monitor or a
            ``step`` out of range.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import grad_flow_table
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
        >>> net[0].bias.requires_grad_(False)
        Parameter containing:
        tensor([...])
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> print(grad_flow_table(net))
        name      norm       max|g|     mean|g|    flag
        0.weight  ...
        0.bias    -          -          -          no grad
        1.weight  ...
        1.bias    1.0000e+00 1.0000e+00 1.0000e+00
    """
    rows, vanishing, exploding, _ = _rows("grad_flow_table", source, kind, step)
    width = max([len("name")] + [len(n) for n, _ in rows])
    lines = [f"{'name':<{width}}  {'norm':<10} {'max|g|':<10} {'mean|g|':<10} flag"]
    for name, s in rows:
        flag = _flag(s, vanishing, exploding)
        if s is None:
            lines.append(f"{name:<{width}}  {'-':<10} {'-':<10} {'-':<10} {flag}")
        else:
            lines.append(
                f"{name:<{width}}  {s.norm:<10.4e} {s.max_abs:<10.4e} {s.mean_abs:<10.4e} {flag}"
            )
    return "\n".join(line.rstrip() for line in lines)


def plot_grad_flow(
    source: GradientMonitor | nn.Module,
    *,
    kind: Kind = "parameters",
    step: int = -1,
    log: bool = True,
) -> Figure:
    """Plot per-layer gradient magnitudes: over layers, and over steps for a monitor.

    The left panel shows, for every parameter (or module output) in forward order, the
    ``max |g|`` as bars and the ``mean |g|`` and L2 norm as markers, with the vanishing/exploding
    thresholds as dashed lines. Unlike the forum snippet it replaces, biases are included,
    ``grad is None`` is drawn as a grey ``no grad`` tick instead of crashing, and NaN/Inf entries
    are marked red.
    Given a :class:`GradientMonitor` with more than one step, a right panel shows the L2 norm of
    every layer over all recorded steps as a heat map (log10).

    Needs matplotlib (the ``plot`` extra), imported lazily. The figure is a
    :class:`matplotlib.figure.Figure` built without pyplot, so no global state or GUI backend
    is touched; save it with ``fig.savefig(path)``.

    Args:
        source: a :class:`GradientMonitor` or a model (current ``.grad`` of its parameters).
        kind: ``"parameters"`` or ``"outputs"`` (monitor only).
        step: the monitor step shown in the left panel (default: the last).
        log: logarithmic magnitude axis (default True).

    Returns:
        The matplotlib Figure.

    Raises:
        ImportError: matplotlib is not installed (``pip install gradlab[plot]``).
        TypeError, ValueError: as :func:`grad_flow_table`.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor, plot_grad_flow
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with GradientMonitor(net) as monitor:
        ...     for _ in range(2):
        ...         net(torch.randn(8, 3)).pow(2).mean().backward()
        >>> fig = plot_grad_flow(monitor)
        >>> len(fig.axes) >= 2
        True
    """
    rows, vanishing, exploding, what = _rows("plot_grad_flow", source, kind, step)
    check_bool("plot_grad_flow", "log", log)
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_grad_flow: matplotlib is not installed; pip install 'gradlab[plot]' "
            "(or use grad_flow_table for a plain-text view)"
        ) from None

    history = source.history if isinstance(source, GradientMonitor) else []
    heat = len(history) > 1
    fig = Figure(figsize=(11 if heat else 7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1) if heat else fig.add_subplot(1, 1, 1)
    _draw_layers(ax, rows, vanishing, exploding, log)
    ax.set_title(f"Gradient flow ({what})")
    if heat:
        _draw_heat(fig, fig.add_subplot(1, 2, 2), history, kind)
    return fig


def _draw_layers(
    ax: Any,
    rows: list[tuple[str, LayerStats | None]],
    vanishing: float,
    exploding: float,
    log: bool,
) -> None:
    """Bars of max |g|, markers of mean |g| and L2 norm, at their true values.

    On a log axis an exact zero has no place: it is drawn as a hollow triangle on the bottom
    edge (labelled ``0``) and the axis reaches a decade below the smallest non-zero value or
    the vanishing threshold, whichever is lower, so no value is drawn where it is not.
    """
    xs = list(range(len(rows)))
    maxes, means, norms, colors = [], [], [], []
    for _, s in rows:
        if s is None or not math.isfinite(s.max_abs):
            maxes.append(math.nan)
            means.append(math.nan)
            norms.append(math.nan)
            colors.append("tab:red" if s is not None else "lightgrey")
        else:
            maxes.append(s.max_abs)
            means.append(s.mean_abs)
            norms.append(s.norm)
            colors.append("tab:cyan")
    positive = [v for v in maxes + means + norms if math.isfinite(v) and v > 0]
    floor = min(positive + ([vanishing] if vanishing > 0 else []), default=1.0) / 10

    def shown(v: float) -> float:  # a zero on a log axis: not drawn (marked on the edge)
        return math.nan if log and v == 0 else v

    base = floor if log else 0.0  # bars rise from the bottom edge to the true max |g|
    heights = [m - base if math.isfinite(m) and m > base else 0.0 for m in maxes]
    ax.bar(xs, heights, bottom=base, color=colors, alpha=0.6, label="max |g|")
    ax.plot(xs, [shown(v) for v in means], "o", color="tab:blue", label="mean |g|")
    ax.plot(xs, [shown(v) for v in norms], "s", color="k", markersize=4, label="L2 norm")
    zeros = [x for x, v in zip(xs, norms) if v == 0]
    if log and zeros:
        ax.plot(
            zeros,
            [floor] * len(zeros),
            "v",
            mfc="none",
            color="k",
            clip_on=False,
            label="norm exactly 0",
        )
    for x, (_, s) in zip(xs, rows):
        if s is None or not math.isfinite(s.max_abs):
            ax.axvline(x, color="lightgrey" if s is None else "tab:red", alpha=0.5)
    if log:
        ax.set_yscale("log")
        top = max([*positive, exploding])
        ax.set_ylim(floor, top * 10)
    if vanishing > 0:
        ax.axhline(vanishing, ls="--", color="tab:orange", lw=1, label=f"vanishing ({vanishing:g})")
    ax.axhline(exploding, ls="--", color="tab:red", lw=1, label=f"exploding ({exploding:g})")
    labels = [n + (" (no grad)" if s is None else "") for n, s in rows]
    ax.set_xticks(xs, labels, rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("gradient magnitude (true values)")
    ax.legend(fontsize=7, loc="best")


def _draw_heat(fig: Any, ax: Any, history: Sequence[StepStats], kind: str) -> None:
    from matplotlib.ticker import MaxNLocator

    names: list[str] = []
    for rec in history:
        for n in rec.params if kind == "parameters" else rec.outputs:
            if n not in names:
                names.append(n)
    grid = []
    for rec in history:
        stats = rec.params if kind == "parameters" else rec.outputs
        row = []
        for n in names:
            s = stats.get(n)
            ok = s is not None and math.isfinite(s.norm) and s.norm > 0
            row.append(math.log10(s.norm) if ok and s is not None else math.nan)
        grid.append(row)
    # The rows are consecutive steps (a bounded history keeps the last ones): the extent puts
    # each row at its step number, and the locator allows integer ticks only.
    first = history[0].step
    extent = (-0.5, len(names) - 0.5, first + len(grid) - 0.5, first - 0.5)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("step")
    ax.set_title("log10 L2 norm over steps (blank: none/NaN/0)")
    fig.colorbar(im, ax=ax)
