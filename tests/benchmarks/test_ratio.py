"""Ratios carry their spread, and targets are judged on it."""

from __future__ import annotations

import copy
import json
import statistics

import pytest

from benchmarks._core import Ratio, Table, judge, spread


def test_ratio_is_the_median_with_the_interquartile_range() -> None:
    samples = [1.3, 1.0, 1.2, 1.1, 1.4]
    r = Ratio(samples)
    assert float(r) == statistics.median(samples) == 1.2
    assert (r.lo, r.hi) == pytest.approx((1.1, 1.3))
    assert spread(r) == (r.lo, r.hi) and spread(2.0) == (2.0, 2.0)
    assert str(r) == f"{r}" == "1.2" and f"{r:.2f}" == "1.20" and json.dumps(r) == "1.2"


def test_spread_covers_the_ratio_of_the_medians_shown() -> None:
    """Where the per-round ratios and the median times tell different stories, the spread
    covers both, so the ratio column never contradicts the time columns unflagged."""
    r = Ratio([2.0, 2.0, 0.5], medians_ratio=0.5)  # medians say faster, rounds say slower
    assert float(r) == 2.0 and r.lo == 0.5 and r.hi == 2.0
    assert judge(r, at_most=1.0).startswith("inconclusive")


def test_division_is_round_by_round() -> None:
    a = Ratio([2.0, 4.0, 6.0], medians_ratio=4.0)
    b = Ratio([1.0, 4.0, 2.0], medians_ratio=2.0)
    q = a / b
    assert isinstance(q, Ratio) and q.samples == (2.0, 1.0, 3.0) and float(q) == 2.0
    assert q.medians_ratio == 2.0
    assert float(a / a) == 1.0 and (a / a).lo == (a / a).hi == 1.0
    inv = 1 / a
    assert inv.samples == (0.5, 0.25, 1 / 6) and inv.medians_ratio == 0.25
    assert isinstance(a / 2, Ratio) and float(a / 2) == 2.0
    assert not isinstance(a / Ratio([1.0]), Ratio)  # other rounds: no per-round division
    assert copy.deepcopy(a).samples == a.samples


def test_table_stores_value_and_spread() -> None:
    t = Table("t", ["variant", "ratio_x"])
    t.add(variant="a", ratio_x=Ratio([0.9, 1.0, 1.1]))
    t.add(variant="b", ratio_x=1.0)
    row_a, row_b = t.to_json()["rows"]
    assert type(row_a["ratio_x"]) is float and row_a["_spread"] == {"ratio_x": [0.95, 1.05]}
    assert "_spread" not in row_b
    assert any("[lo-hi]" in n for n in t.to_json()["notes"])


@pytest.mark.parametrize(
    ("samples", "kw", "verdict"),
    [
        ([1.01, 1.02, 1.03], {"at_most": 1.1}, "met (<= 1.10x)"),
        ([1.2, 1.3, 1.4], {"at_most": 1.1}, "missed (<= 1.10x)"),
        ([1.0, 1.1, 1.2], {"at_most": 1.1}, "inconclusive: spread 1.05-1.15x crosses"),
        ([12.0, 13.0, 14.0], {"at_least": 10.0}, "met (>= 10.00x)"),
        ([8.0, 9.0, 9.5], {"at_least": 10.0}, "missed (>= 10.00x)"),
        ([9.0, 10.0, 11.0], {"at_least": 10.0}, "inconclusive"),
    ],
)
def test_judge(samples: list[float], kw: dict[str, float], verdict: str) -> None:
    assert judge(Ratio(samples), **kw).startswith(verdict)


def test_judge_needs_one_target() -> None:
    with pytest.raises(ValueError, match="judge: give exactly one of at_most or at_least"):
        judge(1.0)
    with pytest.raises(ValueError, match="judge: give exactly one"):
        judge(1.0, at_most=1.0, at_least=1.0)
    with pytest.raises(ValueError, match="Ratio: samples is empty"):
        Ratio([])


def test_core_doctests() -> None:
    """benchmarks/ is not in pytest's testpaths: run its doctests here."""
    import doctest

    from benchmarks import _core

    assert doctest.testmod(_core).failed == 0
    assert doctest.testmod(_core).attempted >= 4


def test_covering_widens_the_spread_only() -> None:
    r = Ratio([1.0, 1.1, 1.2], medians_ratio=1.12)
    w = r.covering(0.9)
    assert float(w) == float(r) and w.samples == r.samples
    assert (w.lo, w.hi) == (0.9, r.hi)
    assert (r.covering(1.1).lo, r.covering(1.1).hi) == (r.lo, r.hi)
