"""plot_diagnostics: one figure with a panel per diagnostic over steps; TensorBoard logging."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from gradlab._validate import check_type, message
from gradlab.hooks._monitor import GradientMonitor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_diagnostics", "write_tensorboard"]

# Panel titles: what the number is, and which way is good.
_TITLES = {
    "noise_scale": "Gradient noise scale B_simple\nbatch sizes below it are used efficiently",
    "ddp_noise_scale": "Noise scale from the DDP all-reduce\nbatch sizes below it are efficient",
    "gsnr": "Gradient signal-to-noise ratio (GSNR)\nhigher: more signal than noise",
    "norm_test": "Norm test (smallest theta it passes)\nlower: the batch is large enough",
    "inner_product_test": "Inner-product test\nlower: the mean is a descent direction",
    "orthogonality_test": "Orthogonality test\nlower: samples agree on the direction",
    "update_size": "Update size ||theta_t - theta_(t-1)||\nsteady or falling; spikes: unstable",
    "distance": "Distance from start ||theta_t - theta_0||\ngrows, then levels off",
    "loss_mean": "Mean per-sample loss\nfalling",
    "loss_var": "Variance of the per-sample losses\nhow much the samples disagree",
    "tic": "Takeuchi information criterion (TIC, diagonal)\nlower: less noise per curvature",
    "tic_trace": "TIC from the Hessian's trace\nlower: less noise per curvature",
    "alpha": "Step-size quality alpha\n0: lands on the minimum; >0 overshoots, -1: no progress",
}
_SIGNED = ("noise_scale", "ddp_noise_scale")  # unbiased estimates that can come out <= 0
_LINEAR = ("alpha",)  # a position on a parabola: always a linear axis
_LATE = ("alpha",)  # known for step t once step t+1 has run
_MODULE_LINES = 8  # modules drawn per panel (the largest ones at the last step)


def _series(
    source: GradientMonitor | Mapping[str, Any],
) -> tuple[list[int], dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """(steps, name -> values, name -> module -> values) of the steps that have diagnostics."""
    steps: list[int] = []
    rows: list[tuple[dict[str, float], dict[str, dict[str, float]]]] = []
    if isinstance(source, GradientMonitor):
        for rec in source.history:
            if rec.diagnostics:
                steps.append(rec.step)
                rows.append((rec.diagnostics, rec.diagnostics_by_module))
    else:
        for d in source.get("diagnostics", []):
            steps.append(int(d["step"]))
            rows.append((d["values"], d["by_module"]))
    names = list(dict.fromkeys(n for total, _ in rows for n in total))
    total = {n: [r[0].get(n, math.nan) for r in rows] for n in names}
    modules: dict[str, dict[str, list[float]]] = {}
    for n in names:
        mods = list(dict.fromkeys(m for _, by in rows for m in by.get(n, {})))
        modules[n] = {m: [r[1].get(n, {}).get(m, math.nan) for r in rows] for m in mods}
    return steps, total, modules


def plot_diagnostics(source: GradientMonitor | Mapping[str, Any]) -> Figure:
    """A dashboard of a run's diagnostics: one panel per instrument over the steps.

    Each panel draws the whole-model value (black) and up to 8 modules (thin coloured lines,
    those largest at the last step), on a log axis when every value is positive. Titles say
    what the instrument measures and which way is good. Steps without diagnostics (``every``)
    are skipped; NaN values (batch size 1) are gaps.

    Needs matplotlib (the ``plot`` extra); the figure is built without pyplot. Save it with
    ``fig.savefig(path)``.

    Args:
        source: a :class:`GradientMonitor` built with ``diagnostics=(...)``, or a state dict
            from :meth:`GradientMonitor.state_dict` (a saved run).

    Raises:
        TypeError: ``source`` is neither.
        ValueError: no step with diagnostics was recorded.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor, plot_diagnostics
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with GradientMonitor(net, diagnostics=("noise_scale", "update_size")) as monitor:
        ...     for _ in range(5):
        ...         opt.zero_grad()
        ...         net(torch.randn(16, 4)).pow(2).mean().backward()
        ...         opt.step()
        >>> fig = plot_diagnostics(monitor)
        >>> [ax.get_title().splitlines()[0] for ax in fig.axes]
        ['Gradient noise scale B_simple', 'Update size ||theta_t - theta_(t-1)||']
    """
    fn = "plot_diagnostics"
    check_type(
        fn,
        "source",
        source,
        (GradientMonitor, Mapping),
        what="a GradientMonitor or its state_dict()",
    )
    steps, total, modules = _series(source)
    if not steps:
        raise ValueError(
            message(
                fn,
                "source",
                "a run with diagnostics",
                source,
                "Build the monitor with diagnostics=('noise_scale', ...) and run a step",
            )
        )
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{fn}: matplotlib is not installed; pip install 'gradlab[plot]'"
        ) from None
    names = list(total)  # in the order the monitor was asked for them
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        _panel(ax, name, steps, total[name], modules.get(name, {}))
    fig.suptitle(f"Training diagnostics, steps {steps[0]}..{steps[-1]}")
    return fig


def _panel(
    ax: Any, name: str, steps: list[int], values: list[float], by_module: dict[str, list[float]]
) -> None:
    """One instrument. A noise-scale estimate <= 0 (noise outweighs the signal: ``||m||^2 <
    S/B``) is not drawn on the log axis but marked on its bottom edge, so a near-zero
    denominator's huge negative values neither squash the panel nor pass for small ones."""
    last = {m: v[-1] for m, v in by_module.items()}
    shown = sorted(by_module, key=lambda m: -last[m] if math.isfinite(last[m]) else math.inf)
    shown = shown[:_MODULE_LINES]
    every = values + [x for m in shown for x in by_module[m]]
    finite = [v for v in every if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    signed = name in _SIGNED  # estimates that may come out <= 0: marked, not drawn
    log = (
        bool(positive)
        and name not in _LINEAR
        and (
            (signed and len(positive) < len(finite))
            or (len(positive) == len(finite) and max(positive) / min(positive) > 20)
        )
    )

    def drawn(vs: list[float]) -> list[float]:
        return [v if not log or v > 0 else math.nan for v in vs]

    for m in shown:
        ax.plot(steps, drawn(by_module[m]), lw=0.9, alpha=0.7, label=m or "model")
    ax.plot(steps, drawn(values), color="k", lw=2, marker="o", ms=3, label="whole model")
    if log:
        ax.set_yscale("log")
        bottom = min(positive) / 3
        ax.set_ylim(bottom=bottom)
        low = [s for s, v in zip(steps, values) if math.isfinite(v) and v <= 0]
        if low:
            ax.plot(
                low,
                [bottom] * len(low),
                "x",
                color="tab:red",
                clip_on=False,
                label="estimate <= 0 (noise > signal)",
            )
    if name == "alpha":  # 0: the step lands on the minimum of the fit along it
        ax.axhline(0.0, color="tab:green", lw=0.9, ls="--", label="minimum along the step")
    ax.set_title(_TITLES.get(name, name), fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")


def write_tensorboard(
    writer: Any,
    monitor: GradientMonitor,
    *,
    step: int | None = None,
    model: nn.Module | None = None,
) -> None:
    """Write the last recorded step to a TensorBoard ``SummaryWriter``.

    Every key of :meth:`GradientMonitor.scalars` goes to ``writer.add_scalar`` (statistics and
    diagnostics alike). Gradient element histograms (what Cockpit users read) go under
    ``grad/hist/<parameter>``, one of two ways:

    * a monitor built with ``histogram_bins=`` (the cheap way): the
      :attr:`~GradientMonitor.grad_histograms` it binned on the device at the end of the
      last step's backward, through ``writer.add_histogram_raw`` (nothing but the counts
      reaches the host; on steps without histograms, ``every > 1``, none are written);
    * ``model=``: each parameter's current ``.grad`` through ``writer.add_histogram`` (every
      gradient is copied to the host and binned there).

    ``alpha`` of a step is known only once the next step has run: each call also writes the
    ``diagnostics/alpha`` of the diagnostic step before the last one, under that step's number.
    Call it after ``loss.backward()`` (and the optimizer step, for ``update_size``), inside or
    after the monitor's context.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar`` and
            ``add_histogram``).
        monitor: the monitor.
        step: the global step to log under (default: the monitor's step number).
        model: the model whose ``.grad`` histograms to write (default: none); not with a
            monitor that keeps its own histograms.

    Raises:
        TypeError: ``writer`` lacks ``add_scalar`` (or ``add_histogram_raw`` for a monitor
            with ``histogram_bins``), or ``model`` is not a module.
        ValueError: nothing recorded yet, or ``model`` given for a monitor with
            ``histogram_bins`` (two ways to write the same histograms).

    Example:
        A writer that only records what it is given stands in for a ``SummaryWriter`` here:

        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor, write_tensorboard
        >>> class Recorder:
        ...     def __init__(self):
        ...         self.tags = []
        ...     def add_scalar(self, tag, value, step):
        ...         self.tags.append(tag)
        ...     def add_histogram(self, tag, values, step):
        ...         self.tags.append(tag)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> writer = Recorder()
        >>> with GradientMonitor(net) as monitor:
        ...     net(torch.randn(16, 4)).pow(2).mean().backward()
        ...     write_tensorboard(writer, monitor, model=net)
        >>> [t for t in writer.tags if t.startswith("grad/hist/")]
        ['grad/hist/0.weight', 'grad/hist/0.bias', 'grad/hist/2.weight', 'grad/hist/2.bias']

        With ``histogram_bins=`` the monitor bins the gradients itself (``add_histogram_raw``):

        >>> class RawRecorder(Recorder):
        ...     def add_histogram_raw(self, tag, lo, hi, num, total, total_sq, limits,
        ...                           counts, step):
        ...         self.tags.append((tag, len(counts), sum(counts)))
        >>> writer = RawRecorder()
        >>> with GradientMonitor(net, histogram_bins=8) as monitor:
        ...     net(torch.randn(16, 4)).pow(2).mean().backward()
        ...     write_tensorboard(writer, monitor)
        >>> [t for t in writer.tags if isinstance(t, tuple)][:2]
        [('grad/hist/0.weight', 9, 32.0), ('grad/hist/0.bias', 9, 8.0)]
    """
    fn = "write_tensorboard"
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            message(
                fn,
                "writer",
                "a SummaryWriter",
                writer,
                "Pass torch.utils.tensorboard.SummaryWriter(log_dir)",
            )
        )
    check_type(fn, "monitor", monitor, GradientMonitor)
    kept = monitor._hist is not None
    if model is not None:
        check_type(fn, "model", model, nn.Module)
        if kept:
            raise ValueError(
                f"{fn}: model= writes histograms of the current .grad, but the monitor keeps "
                "its own (histogram_bins=); drop model= (or build the monitor without "
                "histogram_bins)"
            )
    if kept and not callable(getattr(writer, "add_histogram_raw", None)):
        raise TypeError(
            message(
                fn,
                "writer",
                "a SummaryWriter with add_histogram_raw (the monitor keeps histograms)",
                writer,
                "Pass torch.utils.tensorboard.SummaryWriter(log_dir)",
            )
        )
    logs = monitor.scalars()
    last = monitor.history[-1].step
    at = last if step is None else step
    late = {f"diagnostics/{n}" for n in _LATE}
    for key, value in logs.items():
        if key in late and not math.isfinite(value):
            continue  # not known yet: written by the next call (below)
        writer.add_scalar(key, value, at)
    _write_late(writer, monitor, last, at)
    for name, h in monitor.grad_histograms.items():
        if h.step == last:
            writer.add_histogram_raw(
                f"grad/hist/{name}",
                h.min,
                h.max,
                h.num,
                h.sum,
                h.sum_squares,
                h.bucket_limits,
                h.bucket_counts,
                at,
            )
    if model is not None:
        for name, p in model.named_parameters():
            if p.grad is not None and p.grad.numel():
                writer.add_histogram(f"grad/hist/{name}", p.grad.detach().float().cpu(), at)


def _write_late(writer: Any, monitor: GradientMonitor, last: int, at: int) -> None:
    """The diagnostics known for a step only after the next one ran (``alpha``): those of the
    latest earlier diagnostic step, under that step's number (shifted as ``at`` is), once."""
    late = [n for n in monitor.diagnostics if n in _LATE]
    if not late:
        return
    history = monitor.history
    for i in range(2, min(len(history), monitor.every + 1) + 1):
        rec = history[-i]
        if rec.step <= monitor._late_written:
            return
        if rec.diagnostics:
            for name in late:
                value = rec.diagnostics.get(name, math.nan)
                if math.isfinite(value):
                    writer.add_scalar(f"diagnostics/{name}", value, at - (last - rec.step))
            monitor._late_written = rec.step
            return
