"""Root conftest: the gradlab pytest plugin (hypothesis profiles, ``device``) and a fixed seed for
the doctests in gradlab/.

The plugin is installed as the ``pytest11`` entry point ``gradlab.testing._plugin``; it is
registered here as well in case this checkout is not the installed gradlab (e.g. ``PYTHONPATH=.``
over another install).
"""

from __future__ import annotations

import pytest
import torch

import gradlab
from gradlab.testing import _plugin


def pytest_configure(config: pytest.Config) -> None:
    # The entry point registers its module (_gradlab_pytest_plugin, re-exporting _plugin's hooks
    # and fixture) under this name: register _plugin itself only where nothing has it.
    if not config.pluginmanager.has_plugin("gradlab.testing._plugin"):
        config.pluginmanager.register(_plugin, "gradlab.testing._plugin")


@pytest.fixture(autouse=True)
def _doctest_seed(doctest_namespace: dict) -> None:
    torch.manual_seed(0)
    doctest_namespace["torch"] = torch
    # Examples are written for a user who typed `import gradlab as gl` (tests/docs checks that
    # they run with nothing else in scope).
    doctest_namespace["gl"] = gradlab
