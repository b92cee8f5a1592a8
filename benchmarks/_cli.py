"""Command line of ``python -m benchmarks``: run suites, write JSON + markdown, compare runs."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import pkgutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._core import SCHEMA, Context, Suite, Table, environment, fmt_bytes, fmt_time

DEFAULT_OUT = Path("benchmarks") / "out"


def discover() -> dict[str, Suite]:
    """Every suite module in ``benchmarks/suites`` that defines ``SUITE``, by name."""
    import benchmarks.suites as pkg

    suites: dict[str, Suite] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.suites.{info.name}")
        suite = getattr(module, "SUITE", None)
        if isinstance(suite, Suite):
            suites[suite.name] = suite
    return suites


def format_cell(column: str, value: Any) -> str:
    """Format by column-name convention: ``*_s`` time, ``*_bytes`` memory, ``*ratio*``/``*_x``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if column.endswith("_s"):
        return fmt_time(value)
    if column.endswith("_bytes"):
        return fmt_bytes(value)
    if "ratio" in column or column.endswith("_x"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_markdown(table: dict[str, Any]) -> str:
    """A result table (JSON form) as a markdown table."""
    cols = table["columns"]
    lines = [f"#### {table['title']}", "", "| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(format_cell(c, row.get(c)) for c in cols) + " |")
    lines += [f"\n{note}" for note in table.get("notes", [])]
    return "\n".join(lines) + "\n"


def print_table(table: dict[str, Any]) -> None:
    """Print a table with rich when installed (the ``bench`` extra), plain text otherwise."""
    cols = table["columns"]
    cells = [[format_cell(c, row.get(c)) for c in cols] for row in table["rows"]]
    try:
        from rich.console import Console
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
    rt = RichTable(title=table["title"], title_justify="left")
    for i, c in enumerate(cols):
        rt.add_column(c, justify="left" if i == 0 else "right")
    for r in cells:
        rt.add_row(*r)
    console = Console()
    if not console.is_terminal:  # piped or logged: do not wrap tables at 80 columns
        console = Console(width=160)
    console.print(rt)
    for note in table.get("notes", []):
        console.print(f"  note: {note}", style="dim")


class Progress:
    """One status line per step on stderr: ``[suite 2/5 12.3s] message``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.suite = ""
        self.start = time.perf_counter()

    def begin(self, suite: str) -> None:
        self.index += 1
        self.suite = suite
        self(f"starting {suite}")

    def __call__(self, msg: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[{self.suite} {self.index}/{self.total} {elapsed:6.1f}s] {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    suites = discover()
    chosen = args.suite or list(suites)
    unknown = [s for s in chosen if s not in suites]
    if unknown:
        print(f"unknown suite(s) {unknown}; available: {sorted(suites)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    size = "quick" if args.quick else "full" if args.full else "default"
    progress = Progress(len(chosen))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "size": size,
        "environment": environment(device),
        "suites": {},
    }
    for name in chosen:
        suite = suites[name]
        progress.begin(name)
        if device.type not in suite.devices:
            progress(f"skipped: runs on {list(suite.devices)} only")
            continue
        t0 = time.perf_counter()
        tables: list[Table] = suite.run(Context(device=device, size=size, progress=progress))
        entry = {
            "description": suite.description,
            "seconds": round(time.perf_counter() - t0, 2),
            "tables": [t.to_json() for t in tables],
        }
        result["suites"][name] = entry
        for t in entry["tables"]:
            print_table(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report_markdown(result))
    progress(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    if args.plot:
        _plot(result, out / f"{stem}.png", progress)
    return 0


def report_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one run (environment first, then every suite's tables)."""
    env = result["environment"]
    lines = [
        f"# gradlab benchmarks ({result['created']}, size {result['size']})",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    for name, suite in result["suites"].items():
        lines += [f"### {name} ({suite['seconds']} s)", "", suite["description"], ""]
        lines += [table_markdown(t) for t in suite["tables"]]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path, progress: Progress) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("--plot needs matplotlib: pip install -e '.[bench]'")
        return
    tables = [
        (s, t)
        for s, suite in result["suites"].items()
        for t in suite["tables"]
        if any("ratio" in c for c in t["columns"])
    ]
    if not tables:
        return
    heights = [max(1.6, 0.22 * len(t["rows"]) + 0.8) for _, t in tables]
    fig, axes = plt.subplots(
        len(tables), 1, figsize=(9, sum(heights)), squeeze=False, height_ratios=heights
    )
    for ax, (suite, t) in zip(axes[:, 0], tables):
        rcol = next(c for c in t["columns"] if "ratio" in c)
        key = t["columns"][0]
        text_cols = [key] + [
            c for c in t["columns"][1:] if all(isinstance(r.get(c), str) for r in t["rows"])
        ]
        labels = [" / ".join(str(r[c]) for c in text_cols) for r in t["rows"]]
        values = [r.get(rcol) or 0.0 for r in t["rows"]]
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{suite}: {t['title']}", fontsize=8)
        ax.set_xlabel(rcol, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    progress(f"wrote {path}")


def compare(paths: Sequence[str]) -> int:
    """Print every numeric cell of two result files side by side with the ratio B/A."""
    a, b = (json.loads(Path(p).read_text()) for p in paths)
    for tag, res in (("A", a), ("B", b)):
        if res.get("schema") != SCHEMA:
            print(f"{tag}: not a gradlab benchmark result (schema {res.get('schema')!r})")
            return 2
        env = res["environment"]
        print(f"{tag}: {res['created']} torch {env['torch']} on {env['device']} ({env['cpu']})")
    shared = [s for s in a["suites"] if s in b["suites"]]
    if not shared:
        print("no suite appears in both files")
        return 1
    for s in shared:
        btables = {t["title"]: t for t in b["suites"][s]["tables"]}
        for ta in a["suites"][s]["tables"]:
            tb = btables.get(ta["title"])
            if tb is None:
                continue
            key = ta["columns"][0]
            brows = {r[key]: r for r in tb["rows"]}
            out = Table(f"{s}: {ta['title']} (B/A)", [key, "column", "A", "B", "B/A ratio"])
            for ra in ta["rows"]:
                rb = brows.get(ra[key])
                if rb is None:
                    continue
                for c in ta["columns"][1:]:
                    va, vb = ra.get(c), rb.get(c)
                    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
                        out.add(
                            **{
                                key: ra[key],
                                "column": c,
                                "A": format_cell(c, va),
                                "B": format_cell(c, vb),
                                "B/A ratio": vb / va,
                            }
                        )
            print_table(out.to_json())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(
            prog="python -m benchmarks compare",
            description="Compare two results JSON files (e.g. CPU vs CUDA, before vs after).",
        )
        p.add_argument("a", help="first results JSON (A)")
        p.add_argument("b", help="second results JSON (B); ratios are B/A")
        ns = p.parse_args(argv[1:])
        return compare([ns.a, ns.b])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="gradlab benchmark suites. `python -m benchmarks compare A.json B.json` "
        "compares two runs.",
    )
    p.add_argument("--suite", action="append", help="suite to run (repeatable); default: all")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest sizes, fewest rounds")
    size.add_argument("--full", action="store_true", help="largest sizes, most rounds")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--list", action="store_true", help="list the available suites and exit")
    p.add_argument("--plot", action="store_true", help="also plot the ratio tables (matplotlib)")
    args = p.parse_args(argv)
    if args.list:
        for name, suite in discover().items():
            print(f"{name:20s} {suite.description}")
        return 0
    return run(args)
