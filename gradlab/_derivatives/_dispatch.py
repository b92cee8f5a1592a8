"""The one dispatch every operation with strategies goes through.

It sits above both :mod:`gradlab._derivatives._registry` (what an operation is and how one strategy
runs) and :mod:`gradlab._derivatives._autotune` (how ``"auto"`` chooses), so that the two never
import each other: the import graph is ``_dispatch -> _autotune -> _registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradlab._derivatives._autotune import run_auto
from gradlab._derivatives._registry import Operation, P, StrategyUnsupported
from gradlab._validate import message

__all__ = ["dispatch"]


def dispatch(
    op: Operation[P], strategy: str, problem: P, validate: Callable[[], None] | None = None
) -> Any:
    """Run ``op`` with ``strategy`` (a registry name or ``"auto"``) on ``problem``.

    ``validate``: argument checks implied by the problem's key, which ``"auto"`` skips on a cache
    hit (:func:`~gradlab._derivatives._autotune.run_auto`); a named strategy always runs them.
    """
    op.check(strategy)
    if strategy == "auto":
        return run_auto(op, problem, validate)
    if validate is not None:
        validate()
    try:
        return op.run(strategy, problem)
    except StrategyUnsupported as exc:
        fix = op.fallback.get(strategy)
        advice = f" Use strategy={fix!r} (or 'auto', which falls back per call)" if fix else ""
        raise ValueError(
            message(op.name, "strategy", "one that can run this f", strategy, f"{exc}.{advice}")
        ) from exc
