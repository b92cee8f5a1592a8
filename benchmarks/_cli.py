"""Command line of ``python -m benchmarks``: run suites, write JSON + markdown, compare runs.

Run it from the repository root (``benchmarks`` is a folder of the repository, not an installed
package). Writes ``benchmarks/out/results-<device>.json`` and ``.md`` (and with ``--plot`` one
``results-<device>-<suite>.png`` per suite).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import pkgutil
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from benchmarks._budget import THREADS_FLOOR, Budget, describe, probe_slowdown
from benchmarks._compare import compare
from benchmarks._core import SCHEMA, Context, Suite, Table, environment, load_average
from benchmarks._progress import Progress
from benchmarks._report import load_warning, print_table, report_markdown

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "out"
RUN_FROM_ROOT = (
    "Run it from the repository root (cd <repository> && python -m benchmarks ...): "
    "`benchmarks` is a folder of the repository, not an installed package, and elsewhere "
    "Python answers 'No module named benchmarks'."
)


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


def load_threshold(cpu_count: int | None, threads: int = 1) -> float:
    """1-minute load average above which a run is flagged as busy.

    This run's own threads (at most one per CPU) plus a quarter of the CPUs: on 2 CPUs, 1.5
    with one thread and 2.5 with two.
    """
    cpus = cpu_count or 1
    return min(max(threads, 1), cpus) + 0.25 * cpus


def _expected(out: Path, stem: str, size: str) -> dict[str, float]:
    """Per suite, its seconds in the previous run of this size in ``out`` (for the ETA)."""
    try:
        prev = json.loads((out / f"{stem}.json").read_text())
        if prev.get("size") != size:
            return {}
        return {n: float(s["seconds"]) for n, s in prev["suites"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _writable(out: Path) -> str | None:
    """``None`` if ``out`` is (or can be made) a folder we can write into, else why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


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
    size = "quick" if args.quick or args.smoke else "full" if args.full else "default"
    label = "smoke" if args.smoke else size
    out = Path(args.out)
    problem = _writable(out)
    if problem is not None:  # checked before any suite runs (they take minutes)
        print(
            f"--out {args.out}: cannot write the results there ({problem}); pass a folder you "
            "can write to, e.g. --out /tmp/gradlab-bench",
            file=sys.stderr,
        )
        return 2
    stem = f"results-{device.type}"
    env = environment(device)
    threshold = load_threshold(env.get("cpu_count"), env.get("threads", 1))
    start_load = env.get("load_average")
    if start_load and start_load[0] > threshold:
        print(
            f"WARNING: the machine is busy (1-minute load average {start_load[0]:.2f} on "
            f"{env.get('cpu_count')} CPUs): times will be noisy; ratios carry their spread.",
            file=sys.stderr,
        )
    expected = {n: suites[n].seconds[size] for n in chosen if size in suites[n].seconds}
    if not args.smoke:
        expected.update(_expected(out, stem, label))
    progress = Progress(chosen, expected=expected)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "size": label,
        "environment": env,
        "suites": {},
    }
    t_run = time.perf_counter()
    try:
        for name in chosen:
            suite = suites[name]
            progress.begin(name)
            if device.type not in suite.devices:
                progress(f"skipped: runs on {list(suite.devices)} only")
                continue
            budget = Budget(
                name,
                expected=suite.seconds.get(size),
                enabled=not args.smoke and not args.no_budget,
            )
            progress.budget = budget
            ctx = Context(
                device=device, size=size, progress=progress, smoke=args.smoke, budget=budget
            )
            threads = torch.get_num_threads()
            if budget.enabled and device.type == "cpu" and threads > 1:
                busy = probe_slowdown(0.25)
                if busy is not None and busy > THREADS_FLOOR:
                    torch.set_num_threads(1)
                    budget.record(
                        "threads",
                        threads,
                        1,
                        f"CPU share: running {busy:.2f}x slower than idle at the start; OpenMP "
                        "threads stall each other on busy CPUs",
                    )
            t0, c0 = time.perf_counter(), time.process_time()
            quiet = progress.without_heartbeat() if suite.single_threaded else nullcontext()
            try:
                with quiet:
                    tables: list[Table] = suite.run(ctx)
            finally:
                torch.set_num_threads(threads)
            cuts = budget.report()
            for cut in cuts:
                progress(f"cut: {describe(cut)}")
            entry = {
                "description": suite.description,
                "seconds": round(time.perf_counter() - t0, 2),
                # CPU time of this process: with one thread, the work done; on a busy machine
                # a lower bound of the idle wall time (timing loops that run for a fixed wall
                # time do less work when they get less of the CPU)
                "cpu_seconds": round(time.process_time() - c0, 2),
                "budget_seconds": budget.seconds,
                "cuts": cuts,
                "tables": [t.to_json() for t in tables],
            }
            result["suites"][name] = entry
            for t in entry["tables"]:
                print_table(t)
    finally:
        progress.close()
    result["seconds"] = round(time.perf_counter() - t_run, 1)
    result["cut"] = sorted(n for n, e in result["suites"].items() if e["cuts"])
    result["cpu_seconds"] = round(sum(e["cpu_seconds"] for e in result["suites"].values()), 1)
    max_load = progress.max_load
    env["load"] = {
        "start": start_load,
        "end": load_average(),
        "max_1min": max_load,
        "threshold": threshold,
        "high": max_load is not None and max_load > threshold,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report_markdown(result))
    warning = load_warning(env)
    if warning:
        print(warning, file=sys.stderr)
    progress(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {result['seconds']} s")
    if args.plot:
        _plot(result, out / stem, progress)
    return 0


def _plot(result: dict[str, Any], stem: Path, progress: Progress) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        progress("--plot needs matplotlib: pip install -e '.[bench]'")
        return
    from benchmarks._plot import plot

    for path in plot(result, stem):
        progress(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(
            prog="python -m benchmarks compare",
            description="Compare two results JSON files (e.g. CPU vs CUDA, before vs after, "
            "quick vs default): rows are matched on case and variant, and whatever cannot be "
            "matched is named.",
            epilog=RUN_FROM_ROOT,
        )
        p.add_argument("a", help="first results JSON (A)")
        p.add_argument("b", help="second results JSON (B); ratios are B/A")
        ns = p.parse_args(argv[1:])
        return compare([ns.a, ns.b])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="gradlab benchmark suites. `python -m benchmarks compare A.json B.json` "
        "compares two runs.",
        epilog=RUN_FROM_ROOT,
    )
    p.add_argument("--suite", action="append", help="suite to run (repeatable); default: all")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest sizes, fewest rounds")
    size.add_argument("--full", action="store_true", help="largest sizes, most rounds")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="quick sizes, every timing cut to a couple of calls: checks that the suites run "
        "(the test suite's setting); its numbers mean nothing",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--no-budget",
        action="store_true",
        help="measure everything as planned even on a busy machine (by default each suite has "
        "a budget of 1.5x its idle time and cuts rounds when the machine is busy, saying so)",
    )
    p.add_argument("--list", action="store_true", help="list the available suites and exit")
    p.add_argument(
        "--plot",
        action="store_true",
        help="also plot the ratios, one PNG per suite (matplotlib, the bench extra)",
    )
    args = p.parse_args(argv)
    if args.list:
        for name, suite in discover().items():
            print(f"{name:20s} {suite.description}")
        return 0
    return run(args)
