"""Shared test fixtures: the ``device`` parametrization (hypothesis profiles: root conftest).

Every test that can run on CUDA takes the ``device`` fixture; the CUDA case is skipped cleanly on
machines without a GPU.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device: ``cpu`` always, ``cuda`` when a GPU is present (skipped otherwise)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
