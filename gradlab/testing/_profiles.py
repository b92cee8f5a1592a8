"""Hypothesis settings profiles that work with torch.

Hypothesis and torch clash with hypothesis' defaults: the first call of a torch op can take far
longer than the 200 ms deadline, and generated tensors are slow enough to trip the ``too_slow``
health check. gradlab registers three profiles:

``gradlab-ci``
    Derandomized (the same examples every run), no deadline, 20 examples per test, no database.
    Used when the environment variable ``CI`` is set.
``gradlab-dev``
    Random, no deadline, 50 examples. The default for local runs.
``gradlab-thorough``
    Random, no deadline, 500 examples: for a long local run before a release.

Select one with ``pytest --hypothesis-profile=gradlab-thorough`` or the environment variable
``GRADLAB_HYPOTHESIS_PROFILE``.

Example:
    >>> from gradlab.testing import register_hypothesis_profiles
    >>> sorted(register_hypothesis_profiles())
    ['gradlab-ci', 'gradlab-dev', 'gradlab-thorough']
"""

from __future__ import annotations

import os

__all__ = ["default_profile", "register_hypothesis_profiles"]


def register_hypothesis_profiles() -> list[str]:
    """Register gradlab's hypothesis profiles and return their names (needs hypothesis).

    The pytest plugin calls this and loads :func:`default_profile`; outside pytest (a script, a
    notebook) load one yourself.

    Example:
        >>> from hypothesis import settings
        >>> from gradlab.testing import register_hypothesis_profiles
        >>> register_hypothesis_profiles()
        ['gradlab-ci', 'gradlab-dev', 'gradlab-thorough']
        >>> settings.get_profile("gradlab-ci").max_examples
        20
    """
    from hypothesis import HealthCheck, settings  # the `test` extra; imported only when used

    suppress = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile(
        "gradlab-ci",
        derandomize=True,
        deadline=None,
        max_examples=20,
        database=None,
        print_blob=True,
        suppress_health_check=suppress,
    )
    settings.register_profile(
        "gradlab-dev", deadline=None, max_examples=50, suppress_health_check=suppress
    )
    settings.register_profile(
        "gradlab-thorough", deadline=None, max_examples=500, suppress_health_check=suppress
    )
    return ["gradlab-ci", "gradlab-dev", "gradlab-thorough"]


def default_profile() -> str:
    """Profile name: ``$GRADLAB_HYPOTHESIS_PROFILE``, else ``gradlab-ci`` under CI, else dev.

    Example:
        >>> import os
        >>> from gradlab.testing import default_profile
        >>> expected = "gradlab-ci" if os.environ.get("CI") else "gradlab-dev"
        >>> default_profile() == os.environ.get("GRADLAB_HYPOTHESIS_PROFILE", expected)
        True
    """
    explicit = os.environ.get("GRADLAB_HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    return "gradlab-ci" if os.environ.get("CI") else "gradlab-dev"
