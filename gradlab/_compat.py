"""The torch versions gradlab supports, checked when this module is imported (first thing
``import gradlab`` does).

``TORCH_MINIMUM`` is the oldest torch release on which the whole test suite passed
(``scripts/compat``, results in ``docs/compat.md``); ``pyproject.toml`` declares the same bound
(a test compares them). An older torch is refused at import with an :class:`ImportError` that names
both versions, instead of failing later, deep inside, on an API it lacks or, worse, giving wrong
results. ``GRADLAB_ALLOW_ANY_TORCH=1`` skips that check, to run the test suite on an older torch
(``scripts/compat`` does, to find the minimum); gradlab is then unsupported.
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["TORCH_MINIMUM", "check_torch_version"]

TORCH_MINIMUM = "2.7"


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string: ``"2.11.0+cu130"`` gives ``(2, 11)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"gradlab: cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: str | None = None) -> None:
    """Raise :class:`ImportError` if ``version`` (default: the installed torch's) is too old.

    Pre-releases and local builds of the minimum release (``2.11.0a0+git...``) are accepted.

    Raises:
        ImportError: torch is older than :data:`TORCH_MINIMUM`; the message names the minimum,
            the version found and where that torch is installed.
    """
    found = str(torch.__version__) if version is None else version
    if _release(found) < _release(TORCH_MINIMUM):
        raise ImportError(
            f"gradlab needs torch>={TORCH_MINIMUM}, but torch {found} is installed "
            f"({getattr(torch, '__file__', '?')}). Older releases lack APIs gradlab uses or give "
            f"wrong results in its tests. Fix: pip install 'torch>={TORCH_MINIMUM}'"
        )


if os.environ.get("GRADLAB_ALLOW_ANY_TORCH") != "1":
    check_torch_version()
