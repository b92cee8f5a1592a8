"""``python -m benchmarks compare A.json B.json``: two runs side by side, ratio B/A per cell.

Tables are matched by suite and title; where the titles differ only in their numbers (a size:
``batch 4`` vs ``batch 16``), by the title with its numbers ignored, if that is unambiguous.
Rows are matched on every key column (case *and* variant, see
:func:`benchmarks._core.key_columns`), so a row is only ever compared with the same row of the
other run; rows of one run only (another size) are named, not silently dropped, and so is every
table that could not be matched, with the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._core import SCHEMA, Table, key_columns
from benchmarks._report import format_cell, print_table


class CompareError(Exception):
    """A result file that cannot be compared; the message is one line for the user."""


def load(path: str, tag: str) -> dict[str, Any]:
    """Read one result file, or raise :class:`CompareError` saying what is wrong in one line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise CompareError(f"compare: {tag} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise CompareError(
            f"compare: {tag} {path!r} is a folder; give its results-<device>.json"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"compare: cannot read {tag} file {path!r}: {e}") from None
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise CompareError(
            f"compare: {tag} file {path!r} is not JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        schema = res.get("schema") if isinstance(res, dict) else None
        raise CompareError(
            f"compare: {tag} file {path!r} is not a gradlab benchmark result (schema {schema!r}, "
            f"expected {SCHEMA!r}); give a results-<device>.json written by python -m benchmarks"
        )
    if not isinstance(res.get("suites"), dict) or not isinstance(res.get("environment"), dict):
        raise CompareError(
            f"compare: {tag} file {path!r} lacks its 'suites' or 'environment' "
            "(truncated or edited?)"
        )
    return res


def _shape(title: str) -> str:
    """A title with its numbers replaced, to match tables of runs of different sizes."""
    return re.sub(r"\d[\d,.]*", "#", title)


def match_tables(
    a: list[dict[str, Any]], b: list[dict[str, Any]]
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[str]]:
    """Pairs of tables with the same title (or the same title but for numbers); and why not."""
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    problems: list[str] = []
    b_left = list(b)
    a_left = []
    for ta in a:
        tb = next((t for t in b_left if t["title"] == ta["title"]), None)
        if tb is None:
            a_left.append(ta)
        else:
            pairs.append((ta, tb))
            b_left.remove(tb)
    for ta in a_left:
        same_a = [t for t in a_left if _shape(t["title"]) == _shape(ta["title"])]
        same_b = [t for t in b_left if _shape(t["title"]) == _shape(ta["title"])]
        if len(same_a) == 1 and len(same_b) == 1:
            pairs.append((ta, same_b[0]))
            b_left.remove(same_b[0])
        elif not same_b:
            problems.append(f"{ta['title']!r}: only in A (no table of that title in B)")
        else:
            problems.append(
                f"{ta['title']!r}: several tables differ from it only in numbers; not guessed"
            )
    for tb in b_left:
        if not any(tb is p[1] for p in pairs):
            problems.append(f"{tb['title']!r}: only in B (no table of that title in A)")
    return pairs, problems


def _keys(table: dict[str, Any]) -> list[str]:
    return list(table.get("keys") or key_columns(table["columns"], table["rows"]))


def _key(row: dict[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row.get(k)) for k in keys)


def compare_tables(
    suite: str, ta: dict[str, Any], tb: dict[str, Any]
) -> tuple[Table | None, list[str]]:
    """One table of the cells of matched rows (A, B, B/A), and what could not be matched.

    The table is ``None`` when no row matches; it has no rows when every matched cell is equal
    and has no ratio (labels only).
    """
    keys_a, keys_b = _keys(ta), _keys(tb)
    title = ta["title"] if ta["title"] == tb["title"] else f"{ta['title']} | B: {tb['title']}"
    if keys_a != keys_b:
        return None, [f"{title!r}: rows are keyed by {keys_a} in A but {keys_b} in B"]
    keys = keys_a
    brows: dict[tuple[str, ...], dict[str, Any]] = {}
    dup: set[tuple[str, ...]] = set()
    for r in tb["rows"]:
        k = _key(r, keys)
        if k in brows:
            dup.add(k)
        brows[k] = r
    out = Table(
        f"{suite}: {title} (B/A)", [*keys, "column", "A", "B", "B/A ratio"], keys=[*keys, "column"]
    )
    only_a: list[str] = []
    seen: set[tuple[str, ...]] = set()
    columns = [c for c in ta["columns"] if c not in keys and c in tb["columns"]]
    for ra in ta["rows"]:
        k = _key(ra, keys)
        if k in seen or k in dup:
            dup.add(k)
            continue
        seen.add(k)
        rb = brows.get(k)
        if rb is None:
            only_a.append(" / ".join(k))
            continue
        sa, sb = ra.get("_spread", {}), rb.get("_spread", {})
        for c in columns:
            va, vb = ra.get(c), rb.get(c)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
            if numeric and va:
                ratio: Any = vb / va  # type: ignore[operator]
            elif numeric or va == vb:
                continue  # a zero in A has no ratio; an equal label says nothing
            else:
                ratio = "changed"
            out.add(
                **dict(zip(keys, k)),
                column=c,
                A=format_cell(c, va, sa.get(c)),
                B=format_cell(c, vb, sb.get(c)),
                **{"B/A ratio": ratio},
            )
    only_b = [" / ".join(k) for k in brows if k not in seen]
    notes = []
    if only_a:
        notes.append(f"rows only in A (not compared): {'; '.join(only_a)}")
    if only_b:
        notes.append(f"rows only in B (not compared): {'; '.join(only_b)}")
    if dup:
        notes.append(
            f"rows whose keys {keys} repeat (not compared): {'; '.join(' / '.join(k) for k in dup)}"
        )
    problems = [f"{title!r}: {n}" for n in notes]  # listed once, under "Not compared"
    if not out.rows and len(seen - dup) == len(only_a):
        problems.append(f"{title!r}: no row of A matches a row of B on {keys}")
        return None, problems
    return out, problems


def compare(paths: Sequence[str]) -> int:
    """Print every cell of two result files side by side with the ratio B/A.

    Returns 0, 1 when nothing could be compared, 2 for a file that is missing or not a result.
    """
    try:
        a, b = (load(p, tag) for p, tag in zip(paths, ("A", "B")))
    except CompareError as e:
        print(e)
        return 2
    for tag, res in (("A", a), ("B", b)):
        env = res["environment"]
        print(
            f"{tag}: {res.get('created')} size {res.get('size')} torch {env.get('torch')} on "
            f"{env.get('device')} ({env.get('cpu')}), load {env.get('load_average')}"
        )
    print("B/A: a cell of B divided by the same cell of A (rows matched on case and variant).")
    problems: list[str] = []
    compared = 0
    for s in a["suites"]:
        if s not in b["suites"]:
            problems.append(f"suite {s}: only in A")
            continue
        pairs, unmatched = match_tables(a["suites"][s]["tables"], b["suites"][s]["tables"])
        problems += [f"suite {s}: table {p}" for p in unmatched]
        for ta, tb in pairs:
            out, why = compare_tables(s, ta, tb)
            problems += [f"suite {s}: table {p}" for p in why]
            if out is not None and not out.rows:
                compared += 1
                print(f"\n{out.title}: every cell of the matched rows is the same")
            elif out is not None:
                compared += 1
                print_table(out.to_json())
    problems += [f"suite {s}: only in B" for s in b["suites"] if s not in a["suites"]]
    if problems:
        print("\nNot compared:")
        for p in problems:
            print(f"  - {p}")
    if not compared:
        print("nothing could be compared: no table of A matches a table of B")
        return 1
    return 0
