"""gradlab.testing: property-based gradient checking (see ../shared/API.md)."""

from __future__ import annotations

from gradlab.testing._profiles import default_profile, register_hypothesis_profiles

__all__ = ["default_profile", "register_hypothesis_profiles"]
