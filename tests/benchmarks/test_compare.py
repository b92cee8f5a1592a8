"""``python -m benchmarks compare``: rows matched on case and variant, unmatched ones named,
one-line errors for files that are missing or not results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _cli, _compare
from benchmarks._core import SCHEMA, Ratio, Table


def _result(batch: int, *, extra_case: bool = False) -> dict[str, Any]:
    """A result file's content: two cases x three variants, ratios with spreads."""
    t = Table(
        f"GP step by critic, batch {batch}",
        ["case", "variant", "median_s", "ratio_vs_grad", "peak_bytes"],
    )
    cases = ["MLP b=64", f"DCGAN b={batch}"] + (["tiny"] if extra_case else [])
    for i, case in enumerate(cases):
        for j, variant in enumerate(["backward", "autograd.grad", "gradlab"]):
            # every variant of a case has a different time: matching on the case alone pairs
            # a variant with another's row and gives ratios far from 1
            base = 1e-3 * (i + 1) * (1, 0.02, 0.5)[j]
            t.add(
                case=case,
                variant=variant,
                median_s=base,
                ratio_vs_grad=Ratio([0.9 * (j + 1), (j + 1), 1.1 * (j + 1)]),
                peak_bytes=1000 * (j + 1),
            )
    power = Table("Catching a planted error", ["case", "checker", "caught"])
    power.add(case="n=128", checker="fast", caught="yes")
    power.add(case="n=128", checker="full", caught="yes")
    return {
        "schema": SCHEMA,
        "created": "2026-11-30T00:00:00+00:00",
        "size": "quick",
        "environment": {"torch": "2.13", "device": "cpu", "cpu": "x", "load_average": [0, 0, 0]},
        "suites": {
            "s": {
                "description": "d",
                "seconds": 1.0,
                "tables": [t.to_json(), power.to_json()],
            }
        },
    }


def _write(path: Path, content: dict[str, Any]) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.fixture()
def tables(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    printed: list[dict[str, Any]] = []
    monkeypatch.setattr(_compare, "print_table", printed.append)
    return printed


def test_a_file_compared_with_itself_shows_only_1x(
    tmp_path: Path, tables: list[dict[str, Any]], capsys
) -> None:
    a = _write(tmp_path / "a.json", _result(4))
    assert _cli.main(["compare", a, a]) == 0
    assert [t["title"] for t in tables] == [
        "s: GP step by critic, batch 4 (B/A)",
    ]  # the power table has only labels, all equal: nothing to show
    (t,) = tables
    assert t["rows"] and {r["B/A ratio"] for r in t["rows"]} == {1.0}
    # every variant of every case is there, by name, for every measured column
    assert {(r["case"], r["variant"], r["column"]) for r in t["rows"]} == {
        (c, v, col)
        for c in ("MLP b=64", "DCGAN b=4")
        for v in ("backward", "autograd.grad", "gradlab")
        for col in ("median_s", "ratio_vs_grad", "peak_bytes")
    }
    out = capsys.readouterr().out
    assert "Not compared" not in out
    assert "Catching a planted error (B/A): every cell of the matched rows is the same" in out


def test_nothing_in_common_is_said(tmp_path: Path, tables: list[dict[str, Any]], capsys) -> None:
    rb = _result(4)
    rb["suites"] = {"other": rb["suites"]["s"]}
    a, b = _write(tmp_path / "a.json", _result(4)), _write(tmp_path / "b.json", rb)
    assert _cli.main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    assert "suite s: only in A" in out and "suite other: only in B" in out
    assert "nothing could be compared" in out


def test_ratios_are_shown_with_their_spread(tmp_path: Path, tables: list[dict[str, Any]]) -> None:
    a = _write(tmp_path / "a.json", _result(4))
    assert _cli.main(["compare", a, a]) == 0
    row = next(r for r in tables[0]["rows"] if r["column"] == "ratio_vs_grad")
    assert row["A"] == row["B"] == "1.00x [0.95-1.05]"


def test_runs_of_different_sizes_match_what_they_can_and_name_the_rest(
    tmp_path: Path, tables: list[dict[str, Any]], capsys
) -> None:
    a = _write(tmp_path / "a.json", _result(4))
    b = _write(tmp_path / "b.json", _result(16, extra_case=True))
    assert _cli.main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    (t,) = tables  # titles "batch 4" and "batch 16" matched with their numbers ignored
    assert t["title"] == "s: GP step by critic, batch 4 | B: GP step by critic, batch 16 (B/A)"
    assert {r["case"] for r in t["rows"]} == {"MLP b=64"}  # the only case in both
    assert {r["B/A ratio"] for r in t["rows"]} == {1.0}
    assert "rows only in A (not compared): DCGAN b=4 / backward" in out
    assert "rows only in B (not compared): DCGAN b=16 / backward" in out
    assert "tiny / gradlab" in out


def test_tables_that_cannot_be_matched_are_named_with_the_reason(
    tmp_path: Path, tables: list[dict[str, Any]], capsys
) -> None:
    ra, rb = _result(4), _result(4)
    rb["suites"]["s"]["tables"][0]["title"] = "Something else entirely"
    rb["suites"]["other"] = {"description": "", "seconds": 0, "tables": []}
    a, b = _write(tmp_path / "a.json", ra), _write(tmp_path / "b.json", rb)
    assert _cli.main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert not tables  # the label table matched, and nothing in it changed:
    assert "s: Catching a planted error (B/A): every cell of the matched rows is the same" in out
    assert "'GP step by critic, batch 4': only in A" in out
    assert "'Something else entirely': only in B" in out
    assert "suite other: only in B" in out


def test_a_changed_label_is_shown(tmp_path: Path, tables: list[dict[str, Any]]) -> None:
    ra, rb = _result(4), _result(4)
    rb["suites"]["s"]["tables"][1]["rows"][0]["caught"] = "no"
    a, b = _write(tmp_path / "a.json", ra), _write(tmp_path / "b.json", rb)
    assert _cli.main(["compare", a, b]) == 0
    power = next(t for t in tables if "Catching" in t["title"])
    assert power["rows"] == [
        {"case": "n=128", "checker": "fast", "column": "caught", "A": "yes", "B": "no",
         "B/A ratio": "changed"}
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "compare: B file '{b}' does not exist"),
        ("{not json", "compare: B file '{b}' is not JSON (line 1, column 2: "),
        ('{"schema": "other/1"}', "compare: B file '{b}' is not a gradlab benchmark result"),
        (
            json.dumps({"schema": SCHEMA, "suites": {}}),
            "compare: B file '{b}' lacks its 'suites' or 'environment'",
        ),
    ],
    ids=["missing", "not-json", "other-schema", "truncated"],
)
def test_bad_files_give_one_line(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    a = _write(tmp_path / "a.json", _result(4))
    b = tmp_path / "b.json"
    if content is not None:
        b.write_text(content)
    assert _cli.main(["compare", a, str(b)]) == 2
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1 and not out.err
    assert lines[0].startswith(message.format(b=b))


def test_key_columns_are_inferred_from_the_rows() -> None:
    from benchmarks._core import key_columns

    rows = [{"case": "a", "variant": "x"}, {"case": "a", "variant": "y"}]
    assert key_columns(["case", "variant", "median_s"], rows) == ["case", "variant"]
    assert key_columns(["variant", "total_s"], [{"variant": "x"}]) == ["variant"]
    rows = [{"case": "a", "checker": "f", "caught": "yes"}, {"case": "a", "checker": "g"}]
    assert key_columns(["case", "checker", "caught"], rows) == ["case", "checker"]
    assert key_columns(["case", "n"], rows, ["n"]) == ["n"]
