"""Benchmark figures come from one source: the summary table of benchmarks/RESULTS.md.

Every speed ratio quoted in the prose and tables of README.md and docs/**/*.md (``1.09x``, ranges
``0.64x-0.73x``) must appear in the summary of RESULTS.md, the record of the last benchmark run;
after a new run, update the quotes (or this test names the stale ones). Code blocks and inline
code are not prose and are not checked.
"""

from __future__ import annotations

import re

from tests.docs._blocks import ROOT, markdown_files

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
_RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x(?![\w])")
_FENCED = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"`[^`\n]+`")


def summary() -> str:
    text = RESULTS.read_text()
    start = text.index("## Summary against the targets")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def quoted_ratios(text: str) -> set[str]:
    prose = _INLINE.sub("", _FENCED.sub("", text))
    return set(_RATIO.findall(prose))


def test_every_quoted_ratio_is_in_the_results_summary():
    measured = quoted_ratios(summary())
    stale = {}
    for path in markdown_files():
        if path.name == "results.md":  # the page that includes RESULTS.md itself
            continue
        missing = sorted(quoted_ratios(path.read_text()) - measured, key=float)
        if missing:
            stale[str(path.relative_to(ROOT))] = [f"{m}x" for m in missing]
    assert not stale, (
        f"ratios quoted but not in the summary of {RESULTS.relative_to(ROOT)}: {stale}; quote "
        "the figures of the last run"
    )


def test_the_readme_quotes_the_results():
    assert len(quoted_ratios((ROOT / "README.md").read_text())) >= 8


def test_the_extraction_reads_prose_only():
    text = "a 1.09x b 0.64x-0.73x `2.5x` 3x3 conv 10x faster\n```python\nx = 7.5x\n```\n"
    assert quoted_ratios(text) == {"1.09", "0.64", "0.73", "10"}
