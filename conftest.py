"""Root conftest: doctests in gradlab/ see a fixed seed and the hypothesis profiles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from gradlab.testing import default_profile, register_hypothesis_profiles

register_hypothesis_profiles()
settings.load_profile(default_profile())


@pytest.fixture(autouse=True)
def _doctest_seed(doctest_namespace: dict) -> None:
    torch.manual_seed(0)
    doctest_namespace["torch"] = torch
