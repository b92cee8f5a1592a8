"""Relative links of README.md and the docs pages point at files that exist."""

from __future__ import annotations

import re

from tests.docs._blocks import ROOT, markdown_files

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    broken = []
    for path in markdown_files():
        for target in _LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
