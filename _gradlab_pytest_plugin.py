"""gradlab's ``pytest11`` entry point: :mod:`gradlab.testing._plugin`, or a warning and nothing.

Installing gradlab installs this module, and pytest imports it in every project of that
environment, whether or not the project uses gradlab. It lives outside the ``gradlab`` package on
purpose: importing ``gradlab.testing._plugin`` runs ``gradlab/__init__.py`` (and imports torch),
which can fail (torch missing, broken, or older than gradlab supports). Such a failure must not
stop an unrelated test run, so it is caught here: the plugin then provides nothing and reports the
cause as a :class:`GradlabPluginWarning` in pytest's warnings summary (or, where warnings are
turned into errors, as a line on stderr, so that ``filterwarnings = error`` cannot turn it into a
failed start).

When gradlab imports, the plugin's hooks and its ``device`` fixture are re-exported from here, so
pytest registers them under the entry point's name ``gradlab.testing._plugin`` (off with
``-p no:gradlab.testing._plugin``).
"""

from __future__ import annotations

import sys

import pytest


class GradlabPluginWarning(pytest.PytestWarning):
    """gradlab's pytest plugin could not load and is disabled for this run."""


try:
    from gradlab.testing._plugin import device, pytest_configure
except Exception as error:  # anything: ImportError, a too-old torch's AttributeError, ...
    _CAUSE = f"{type(error).__name__}: {error}"

    def pytest_configure(config: pytest.Config) -> None:  # type: ignore[no-redef]
        message = (
            "gradlab's pytest plugin is disabled for this run: importing gradlab failed with "
            f"{_CAUSE}. Its hypothesis profiles (gradlab-ci, gradlab-dev, gradlab-thorough) and "
            "its `device` fixture are not available. Fix the installation (the message above "
            "says what failed), or turn the plugin off with -p no:gradlab.testing._plugin."
        )
        try:
            config.issue_config_time_warning(GradlabPluginWarning(message), stacklevel=2)
        except Warning:  # warnings are errors here; a broken plugin must not stop the run
            print(f"{GradlabPluginWarning.__name__}: {message}", file=sys.stderr)

else:
    __all__ = ["device", "pytest_configure"]
