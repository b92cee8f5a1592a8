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

    Example:
        >>> from gradlab.testing import GradientCheckError, check_gradients
        >>> class Square(torch.autograd.Function):  # a backward missing its factor 2
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         (x,) = ctx.saved_tensors
        ...         return grad * x
        >>> try:
        ...     check_gradients(Square.apply, torch.tensor([1.0, 2.0], dtype=torch.float64))
        ... except GradientCheckError as e:
        ...     print(e.location, e.analytical, round(e.numerical, 6), e.mismatches)
        d output 0[1] / d input 0[1] 2.0 4.0 2
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

    Example:
        >>> from gradlab.testing import NonDifferentiablePointError, check_gradients
        >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> try:
        ...     check_gradients(torch.relu, x)
        ... except NonDifferentiablePointError as e:
        ...     print([str(k) for k in e.kinks])
        ['d output 0[0] / d input 0[0]']
        >>> len(check_gradients(torch.relu, x, kinks="skip").kinks)  # recorded instead
        1
    """

    def __init__(self, message: str, *, kinks: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.kinks = kinks
