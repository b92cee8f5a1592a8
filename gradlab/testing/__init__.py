"""gradlab.testing: gradient checking and hypothesis strategies for property tests.

* :func:`check_gradients`: autograd's first (and second) derivatives against finite differences,
  every entry (``mode="full"``) or random signed directions (``mode="fast"``).
* :func:`numerical_jacobian`: batched finite-difference Jacobians.
* :mod:`gradlab.testing.strategies`: hypothesis strategies for tensors, shapes, dtypes, devices.
* :func:`register_hypothesis_profiles` / :func:`default_profile`: hypothesis settings that work
  with torch.
"""

from __future__ import annotations

from gradlab.testing import strategies
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
