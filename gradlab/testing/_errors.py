"""Exceptions raised by :func:`gradlab.testing.check_gradients`.

Both are :class:`AssertionError` subclasses (so a failed check reads as a failed test under pytest
and hypothesis) and :class:`gradlab.GradlabError` subclasses. They are siblings, not parent and
child: catching :class:`GradientCheckError` never swallows a non-differentiable point, and a wrong
gradient is never reported as a :class:`NonDifferentiablePointError`.
"""

from __future__ import annotations

from gradlab._errors import GradlabError

__all__ = ["GradientCheckError", "NonDifferentiablePointError"]


class GradientCheckError(GradlabError, AssertionError):
    """Autograd's derivative disagrees with finite differences beyond the tolerance.

    The message names the output and input, the worst element's index in each, the analytical and
    numerical values and the tolerance. Attributes: ``location`` (a
    :class:`~gradlab.testing.Location`), ``analytical``, ``numerical``, ``tolerance`` (floats) and
    ``mismatches`` (how many entries failed in the worst output/input block; ``None`` when only
    random directions were compared).
    """

    def __init__(
        self,
        message: str,
        *,
        location: object = None,
        analytical: float = float("nan"),
        numerical: float = float("nan"),
        tolerance: float = float("nan"),
        mismatches: int | None = None,
    ) -> None:
        super().__init__(message)
        self.location = location
        self.analytical = analytical
        self.numerical = numerical
        self.tolerance = tolerance
        self.mismatches = mismatches


class NonDifferentiablePointError(GradlabError, AssertionError):
    """The check point is at (or within one finite-difference step of) a kink.

    Raised only when, for every mismatching entry, the left and right one-sided differences
    disagree with each other beyond the tolerance at two step sizes (a jump that does not shrink
    with the step, unlike the curvature of a smooth function) *and* the analytical value lies
    between them (within the tolerance). Examples: ``relu`` or ``abs`` at 0, ``max`` with ties.
    Attribute ``kinks``: the :class:`~gradlab.testing.Location` of each such entry.
    """

    def __init__(self, message: str, *, kinks: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.kinks = kinks
