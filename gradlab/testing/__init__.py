"""gradlab.testing: gradient checking and hypothesis strategies for property tests.

* :func:`check_gradients`: autograd's first (and second) derivatives against finite differences,
  every entry (``mode="full"``) or random signed directions (``mode="fast"``).
* :func:`numerical_jacobian`: batched finite-difference Jacobians.
* :mod:`gradlab.testing.strategies`: hypothesis strategies for tensors, shapes, dtypes, devices.
* :func:`register_hypothesis_profiles` / :func:`default_profile`: hypothesis settings that work
  with torch.
* A pytest plugin (:mod:`gradlab.testing._plugin`, the ``pytest11`` entry point ``gradlab``)
  that registers and loads those profiles and provides the ``device`` fixture in any project
  where gradlab is installed.

Only the strategies and the profiles need hypothesis (the ``test`` extra); ``check_gradients`` and
``numerical_jacobian`` need torch alone, so ``strategies`` is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradlab.testing._errors import GradientCheckError, NonDifferentiablePointError
from gradlab.testing._profiles import default_profile, register_hypothesis_profiles
from gradlab.testing.check import GradientCheckReport, Location, check_gradients
from gradlab.testing.numerical import numerical_jacobian

__all__ = [
    "GradientCheckError",
    "GradientCheckReport",
    "Location",
    "NonDifferentiablePointError",
    "check_gradients",
    "default_profile",
    "numerical_jacobian",
    "register_hypothesis_profiles",
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":
        try:
            module = importlib.import_module("gradlab.testing.strategies")
        except ModuleNotFoundError as e:
            if e.name != "hypothesis":
                raise
            raise ImportError(
                "gradlab.testing.strategies needs hypothesis, which is not installed. Fix: "
                "pip install hypothesis (or install gradlab with the test extra: "
                "pip install -e '.[test]')"
            ) from None
        globals()["strategies"] = module
        return module
    raise AttributeError(f"module 'gradlab.testing' has no attribute {name!r}")
