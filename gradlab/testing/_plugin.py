"""The gradlab pytest plugin: hypothesis profiles that work with torch, and a ``device`` fixture.

Installed with gradlab as the ``pytest11`` entry point ``gradlab.testing._plugin`` (named after
the module, so ``pytest -p gradlab.testing._plugin`` also works where gradlab is not installed and
is harmless where it is; disable it with ``pytest -p no:gradlab.testing._plugin``), so any
project where gradlab is installed gets the following. (The entry point's module is the top-level
``_gradlab_pytest_plugin``, which re-exports this module's hooks and fixture, or, where gradlab
cannot be imported, warns and provides nothing instead of failing the run.)

* the hypothesis profiles ``gradlab-ci``, ``gradlab-dev`` and ``gradlab-thorough`` (see
  :func:`~gradlab.testing.register_hypothesis_profiles`), registered when the plugin loads;
* one of them loaded at once: ``$GRADLAB_HYPOTHESIS_PROFILE`` if set, else ``gradlab-ci`` when
  ``CI`` is set, else ``gradlab-dev`` (:func:`~gradlab.testing.default_profile`). It is loaded
  before any ``conftest.py`` is imported, so a project's own ``settings.load_profile(...)`` in its
  conftest still wins, and ``pytest --hypothesis-profile=NAME`` (hypothesis' own option) wins over
  both;
* the ``device`` fixture: each test taking it runs once on ``cpu`` and once on ``cuda``, the
  CUDA case skipped cleanly on machines without a GPU.

Without hypothesis installed only the fixture is provided. The plugin imports gradlab (and so
torch) when pytest starts.
"""

from __future__ import annotations

import os

import pytest
import torch

from gradlab.testing._profiles import default_profile, register_hypothesis_profiles

__all__ = ["CUDA", "DEVICES", "device", "requires_cuda"]

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _load_profile() -> bool:
    """Register gradlab's profiles and load the default one; False if it is not registered
    (yet: a project's conftest may register the profile that the variable names)."""
    try:
        from hypothesis import settings
    except ModuleNotFoundError:
        return True
    register_hypothesis_profiles()
    try:
        settings.load_profile(default_profile())
    except Exception:  # hypothesis.errors.InvalidArgument: not registered
        return False
    return True


_LOADED = _load_profile()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if _LOADED or config.getoption("hypothesis_profile", None):
        return
    from hypothesis import settings

    name = default_profile()
    try:
        settings.load_profile(name)
    except Exception:
        raise pytest.UsageError(
            f"GRADLAB_HYPOTHESIS_PROFILE={os.environ.get('GRADLAB_HYPOTHESIS_PROFILE')!r} is not a "
            "registered hypothesis profile; use gradlab-ci, gradlab-dev or gradlab-thorough, or "
            "register yours with hypothesis.settings.register_profile in conftest.py"
        ) from None


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device: ``cpu`` always, ``cuda`` when a GPU is present (skipped otherwise)."""
    return torch.device(request.param)
