"""How results look: cells, tables on the terminal, the markdown report, the load warning."""

from __future__ import annotations

from typing import Any

from benchmarks._budget import describe
from benchmarks._core import fmt_bytes, fmt_time, is_ratio_column


def format_cell(column: str, value: Any, spread: list[float] | None = None) -> str:
    """Format by column-name convention: ``*_s`` time, ``*_bytes`` memory, ``*ratio*``/``*_x``.

    A ratio with a ``spread`` ``[lo, hi]`` (see :class:`benchmarks._core.Ratio`) prints as
    ``1.09x [1.05-1.12]``.
    """
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if column.endswith("_s"):
        return fmt_time(value)
    if column.endswith("_bytes"):
        return fmt_bytes(value)
    if is_ratio_column(column):
        text = f"{value:.2f}x"
        if spread is not None:
            text += f" [{spread[0]:.2f}-{spread[1]:.2f}]"
        return text
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def row_cells(table: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """A row's cells, in the table's column order, ratios with their spreads."""
    spreads = row.get("_spread", {})
    return [format_cell(c, row.get(c), spreads.get(c)) for c in table["columns"]]


def table_markdown(table: dict[str, Any]) -> str:
    """A result table (JSON form) as a markdown table."""
    cols = table["columns"]
    lines = [f"#### {table['title']}", "", "| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(row_cells(table, row)) + " |")
    lines += [f"\n{note}" for note in table.get("notes", [])]
    return "\n".join(lines) + "\n"


def print_table(table: dict[str, Any]) -> None:
    """Print a table with rich when installed (the ``bench`` extra), plain text otherwise."""
    cols = table["columns"]
    cells = [row_cells(table, row) for row in table["rows"]]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table as RichTable
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        print(f"\n{table['title']}")
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        print("  ".join("-" * w for w in widths))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        for note in table.get("notes", []):
            print(f"  note: {note}")
        return
    rt = RichTable(title=escape(table["title"]), title_justify="left")
    for i, c in enumerate(cols):
        rt.add_column(escape(c), justify="left" if i == 0 else "right")
    for r in cells:  # escaped: "[1.05-1.12]" is not rich markup
        rt.add_row(*(escape(v) for v in r))
    console = Console()
    if not console.is_terminal:  # piped or logged: do not wrap tables at 80 columns
        console = Console(width=160)
    console.print(rt)
    for note in table.get("notes", []):
        console.print(f"  note: {note}", style="dim", markup=False)


def load_warning(env: dict[str, Any]) -> str | None:
    """The warning for a run on a busy machine, or ``None`` (from ``env["load"]``)."""
    load = env.get("load")
    if not load or not load.get("high"):
        return None
    return (
        f"WARNING: the machine was busy during this run (highest 1-minute load average "
        f"{load['max_1min']:.2f} on {env.get('cpu_count')} CPUs, above {load['threshold']:.2f}: "
        "other processes shared the CPUs). Ratios of variants measured side by side stay "
        "usable with their spreads; absolute times do not. Re-run on an idle machine."
    )


def report_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one run (load warning and environment first, then every table)."""
    env = result["environment"]
    lines = [f"# gradlab benchmarks ({result['created']}, size {result['size']})", ""]
    warning = load_warning(env)
    if warning:
        lines += [f"**{warning}**", ""]
    machine = {k: v for k, v in env.items() if k != "load"}
    lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if "load" in env:
        load = env["load"]
        lines += [
            f"Load average: {load['start']} at the start, {load['end']} at the end, highest "
            f"1-minute {load['max_1min']} (warning threshold {load['threshold']}).",
            "",
        ]
    if "seconds" in result:
        lines += [
            f"Wall time: {result['seconds']} s (CPU time of the process: "
            f"{result.get('cpu_seconds', '-')} s).",
            "",
        ]
    if result.get("cut"):
        lines += [
            f"**Measurements cut to stay within the time budget** in {', '.join(result['cut'])} "
            "(the machine was busy): fewer rounds or shorter blocks, so wider spreads; each "
            "suite below lists its cuts.",
            "",
        ]
    for name, suite in result["suites"].items():
        cpu = f", CPU {suite['cpu_seconds']} s" if "cpu_seconds" in suite else ""
        budget = suite.get("budget_seconds")
        budget_text = f", budget {budget:g} s" if budget else ""
        lines += [f"### {name} ({suite['seconds']} s{cpu}{budget_text})", "", suite["description"]]
        lines += [""]
        if suite.get("cuts"):
            lines += ["Cut: " + "; ".join(describe(c) for c in suite["cuts"]) + ".", ""]
        lines += [table_markdown(t) for t in suite["tables"]]
    return "\n".join(lines)
