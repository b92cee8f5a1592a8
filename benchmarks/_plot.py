"""``--plot``: one PNG per suite, one panel per ratio column of each of its tables.

Each panel is titled with the table and says what the ratio is and which direction is better
(a ``speedup`` ratio: higher; every other ratio, a time over a baseline's: lower). Bars carry
their spread (``[lo-hi]``, see :class:`benchmarks._core.Ratio`) as error bars; a panel uses a
log scale only when its own values span more than :data:`LOG_SPAN` times, so a scale never
changes within a panel. Tables keyed by case and variant draw one group of bars per case, one
colour per variant (legend on the right). Bars start at 1 (the baseline), so a bar to the left is
faster (or, for a speedup, slower) than the baseline. Panels sit in a grid of at most two
columns that fits a screen (about 1450 px wide at 80 dpi).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from benchmarks._core import higher_is_better, is_ratio_column, key_columns

LOG_SPAN = 20.0
_MAX_BARS = 48  # beyond this a panel would not be readable: the rest is left to the tables


def _panels(suite: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(table, column) per measured ratio column. Where a table records spreads, a ratio column
    without any (a constant such as a published reference) is not a measurement: skipped."""
    panels = []
    for t in suite["tables"]:
        spread_cols = {c for r in t["rows"] for c in r.get("_spread", {})}
        for c in t["columns"]:
            if not is_ratio_column(c) or (spread_cols and c not in spread_cols):
                continue
            if any(isinstance(r.get(c), (int, float)) for r in t["rows"]):
                panels.append((t, c))
    return panels


def _draw(ax: Any, table: dict[str, Any], column: str) -> None:
    keys = list(table.get("keys") or key_columns(table["columns"], table["rows"]))
    rows = [r for r in table["rows"] if isinstance(r.get(column), (int, float))][:_MAX_BARS]
    values = [float(r[column]) for r in rows]
    spreads = [r.get("_spread", {}).get(column, [v, v]) for r, v in zip(rows, values)]
    lo = [v - s[0] for v, s in zip(values, spreads)]
    hi = [s[1] - v for v, s in zip(values, spreads)]
    if len(keys) >= 2:  # groups: one per case (all keys but the last), a colour per variant
        cases = list(dict.fromkeys(" / ".join(str(r[k]) for k in keys[:-1]) for r in rows))
        variants = list(dict.fromkeys(str(r[keys[-1]]) for r in rows))
        height = 0.8 / len(variants)
        cmap = _colours(len(variants))
        for j, var in enumerate(variants):
            ys, xs, el, eh = [], [], [], []
            for i, r in enumerate(rows):
                if str(r[keys[-1]]) != var:
                    continue
                case = " / ".join(str(r[k]) for k in keys[:-1])
                ys.append(cases.index(case) - 0.4 + (j + 0.5) * height)
                xs.append(values[i])
                el.append(max(lo[i], 0.0))
                eh.append(max(hi[i], 0.0))
            ax.barh(
                ys,
                [x - 1.0 for x in xs],
                left=1.0,
                height=height,
                color=cmap[j],
                label=var,
                xerr=[el, eh],
                capsize=2,
            )
            ax.plot(xs, ys, "|", color="k", markersize=6)  # the value, visible even at 1.00x
        ax.set_yticks(range(len(cases)), [textwrap.fill(c, 28) for c in cases], fontsize=9)
        ax.legend(
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title=keys[-1],
            title_fontsize=8,
        )
    else:
        labels = [" / ".join(str(r.get(k)) for k in keys) for r in rows]
        ax.barh(
            range(len(rows)),
            [v - 1.0 for v in values],
            left=1.0,
            xerr=[[max(x, 0.0) for x in lo], [max(x, 0.0) for x in hi]],
            color="tab:blue",
            capsize=2,
        )
        ax.plot(values, range(len(rows)), "|", color="k", markersize=6)
        ax.set_yticks(range(len(rows)), [textwrap.fill(x, 28) for x in labels], fontsize=9)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0] + [s[0] for s in spreads if s[0] > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    better = "higher is better" if higher_is_better(column) else "lower is better"
    arrow = "\u2192" if higher_is_better(column) else "\u2190"
    ax.set_title(f"{textwrap.fill(table['title'], 70)}\n{column}: {better} {arrow}", fontsize=10)
    ax.set_xlabel(f"{column} (bars from 1 = the baseline; whiskers: spread)", fontsize=9)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")


def _colours(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_suite(name: str, suite: dict[str, Any], path: Path) -> bool:
    """Write ``path`` (PNG) for one suite; ``False`` when it has no ratio to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(suite)
    if not panels:
        return False
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    bars = [min(len(t["rows"]), _MAX_BARS) for t, _ in panels]
    row_h = [
        max(2.6, min(7.0, 0.14 * max(bars[i * ncols : (i + 1) * ncols]) + 1.6))
        for i in range(nrows)
    ]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(9 * ncols + (1 if ncols == 1 else 0), sum(row_h) + 0.4),
        squeeze=False,
        height_ratios=row_h,
    )
    for ax, (table, column) in zip(axes.flat, panels):
        _draw(ax, table, column)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(textwrap.fill(f"{name}: {suite['description']}", 110), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def plot(result: dict[str, Any], stem: Path) -> list[Path]:
    """One PNG per suite of ``result``: ``<stem>-<suite>.png``; the paths written."""
    written = []
    for name, suite in result["suites"].items():
        path = stem.with_name(f"{stem.name}-{name}.png")
        if plot_suite(name, suite, path):
            written.append(path)
    return written
