"""Checking a custom ``torch.autograd.Function`` with hypothesis and gradlab.testing.

``LogCosh`` is a numerically stable ``log(cosh(x))`` (a smooth L1 loss) with a hand-written
backward ``tanh(x) * grad`` and double backward. ``BuggyLogCosh`` has a planted bug a unit test
at a few hand-picked points misses: its backward is right except for |x| > 2, where it uses a
wrong asymptotic formula. :func:`main` runs a hypothesis property test (elements drawn from
[-4, 4]) with :func:`gradlab.testing.check_gradients` on each and reports which passed: the buggy
one is caught, with the failing element named. The correct one is also checked to second order
(its double backward). Second order on the buggy one would report the jump its backward makes at
|x| = 2 as a non-differentiable point instead.

Run ``python examples/check_a_custom_function.py`` or call :func:`main` (the test suite does).
Under pytest, write the same ``@given`` test in a test file: the gradlab pytest plugin loads the
hypothesis profiles for torch.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings

from gradlab.testing import GradientCheckError, NonDifferentiablePointError, check_gradients
from gradlab.testing import strategies as gst

LOG2 = math.log(2.0)


def _logcosh(x: torch.Tensor) -> torch.Tensor:
    # log cosh x = |x| + log1p(exp(-2|x|)) - log 2: no overflow for large |x|
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - LOG2


class LogCosh(torch.autograd.Function):
    """log(cosh(x)); backward tanh(x) * g, itself differentiable (autograd's double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _logcosh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.tanh(x) * grad


class BuggyLogCosh(torch.autograd.Function):
    """The same, with a wrong "asymptotic" derivative sign(x) * (1 - exp(-|x|)) for |x| > 2."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _logcosh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        asymptotic = torch.sign(x) * (1 - torch.exp(-x.abs()))
        return torch.where(x.abs() > 2, asymptotic, torch.tanh(x)) * grad


def property_test(fn, *, order: int = 1, max_examples: int = 30):
    """A hypothesis test of ``fn``'s derivatives up to ``order`` on tensors in [-4, 4]."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
    )
    @given(gst.tensors(shape=gst.shapes(max_dims=2, max_side=4), min_value=-4.0, max_value=4.0))
    def test(x):
        check_gradients(fn, x, order=order)

    return test


def main(*, max_examples: int = 30, verbose: bool = True) -> dict[str, str]:
    """Run the property test on both functions; return ``{name: "ok" or the error message}``."""
    results = {}
    cases = [("LogCosh", LogCosh.apply, 2), ("BuggyLogCosh", BuggyLogCosh.apply, 1)]
    for name, fn, order in cases:
        try:
            property_test(fn, order=order, max_examples=max_examples)()
            results[name] = "ok"
        except (GradientCheckError, NonDifferentiablePointError) as e:
            results[name] = str(e).splitlines()[0]
        if verbose:
            print(f"{name}: {results[name]}")
    return results


if __name__ == "__main__":
    main()
