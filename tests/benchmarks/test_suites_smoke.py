"""Every suite in benchmarks/suites runs end to end under the smoke setting (seconds, not
minutes: quick sizes, every timing cut to a couple of calls). The numbers are not checked here;
what is checked is that each suite runs and writes tables with rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import _cli

SUITES = sorted(_cli.discover())


def test_the_suites_are_discovered() -> None:
    assert {"grad_vs_backward", "hooks"} <= set(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_suite_runs_under_smoke(name: str, tmp_path: Path) -> None:
    assert _cli.main(["--smoke", "--suite", name, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results-cpu.json").read_text())
    assert result["size"] == "smoke"
    tables = result["suites"][name]["tables"]
    assert tables and all(t["rows"] for t in tables)
    for t in tables:  # a target verdict agrees with the spread the table shows
        for row in t["rows"]:
            verdict = row.get("target")
            if not isinstance(verdict, str) or not row.get("_spread"):
                continue
            m = re.search(r"\((<=|>=) ([\d.]+)x\)", verdict)
            assert m, verdict
            ((lo, hi),) = row["_spread"].values()
            goal = float(m.group(2))
            ok, bad = (hi <= goal, lo > goal) if m.group(1) == "<=" else (lo >= goal, hi < goal)
            expected = "met" if ok else "missed" if bad else "inconclusive"
            assert verdict.startswith(expected), (row, verdict)
