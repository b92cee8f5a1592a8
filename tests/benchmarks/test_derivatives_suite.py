"""The derivatives benchmark suite times exactly the registries' strategies, auto and heuristic."""

from __future__ import annotations

import gradlab as gl
from benchmarks.suites.derivatives import _strategies
from gradlab._derivatives import OPERATIONS


def test_suite_variants_come_from_the_registries():
    for op, registry in OPERATIONS.items():
        seen = []
        fns = _strategies(op, lambda s, seen=seen: seen.append((s, gl.is_autotune_enabled())))
        assert list(fns) == [*registry.names, "auto", "heuristic"]
        for fn in fns.values():
            fn()
        enabled = gl.is_autotune_enabled()
        assert seen == [(s, enabled) for s in registry.names] + [("auto", enabled), ("auto", False)]
