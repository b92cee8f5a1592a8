"""Module selection by name globs, shared by every hook context in :mod:`gradlab.hooks`."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from gradlab._validate import message

__all__ = ["check_model", "select_modules"]

_SHOWN = 8  # module names listed in a "no match" error


def check_model(fn_name: str, model: object) -> nn.Module:
    """Return ``model`` if it is a :class:`torch.nn.Module`, else raise a TypeError with the fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            message(
                fn_name,
                "model",
                "a torch.nn.Module",
                model,
                "Pass the network (e.g. nn.Sequential(...)) whose layers should be hooked",
            )
        )
    return model


def select_modules(
    fn_name: str, model: nn.Module, patterns: tuple[str, ...]
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` selected by name globs, in registration order, without duplicates.

    With no pattern every *leaf* module (one without children) is selected; a model that is
    itself a leaf is selected under the name ``""``. A pattern is matched with
    :func:`fnmatch.fnmatchcase` against every module name (``"layer1.*"``, ``"*.conv?"``,
    ``"fc"``), containers included, so ``"layer1"`` selects the block ``layer1`` itself. A
    module matched by several patterns is selected once.

    Raises:
        TypeError: a pattern is not a string.
        ValueError: a pattern matches no module; the message lists some module names.
    """
    named = list(model.named_modules())
    if not patterns:
        leaves = [(n, m) for n, m in named if next(m.children(), None) is None]
        return leaves
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(
                message(
                    fn_name,
                    "patterns",
                    "module-name glob strings",
                    p,
                    "Pass names such as 'layer1.*' or '*.conv1'",
                )
            )
    hit: set[str] = set()
    for p in patterns:
        hits = [n for n, _ in named if fnmatchcase(n, p)]
        if not hits:
            names = [n for n, _ in named if n]
            shown = ", ".join(repr(n) for n in names[:_SHOWN])
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            raise ValueError(
                f"{fn_name}: pattern {p!r} matches no module of {type(model).__name__}; "
                f"module names are {shown or '(none: the model has no submodules)'}{more}. "
                "Use one of these names or a glob such as '*' or 'layer1.*'"
            )
        hit.update(hits)
    return [(n, m) for n, m in named if n in hit]
