"""Shared test fixtures. The ``device`` fixture (``cpu``, plus ``cuda`` when available, skipped
cleanly otherwise) and the hypothesis profiles come from the gradlab pytest plugin
(``gradlab/testing/_plugin.py``, registered by the root conftest)."""

from __future__ import annotations

import pytest
import torch

from gradlab.testing._plugin import CUDA, DEVICES, requires_cuda

__all__ = ["CUDA", "DEVICES", "requires_cuda"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
