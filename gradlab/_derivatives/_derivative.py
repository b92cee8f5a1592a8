"""k-th derivatives of elementwise functions: Taylor mode, nested forward mode, nested reverse mode.

For an elementwise ``f`` the k-th derivative of ``sum(f(x))`` w.r.t. ``x`` is, elementwise,
``f^(k)(x_i)``: the k-th derivative along the all-ones direction. Three strategies compute it
(the registry :data:`DERIVATIVE`): Taylor mode (:mod:`gradlab._derivatives._taylor`, O(k^2) at
worst), nested ``torch.func.jvp`` (work doubles per order) and nested
``torch.autograd.grad(create_graph=True)`` (the textbook way; work grows about 2.6x per order,
pytorch/pytorch#111563).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradlab._derivatives import _registry
from gradlab._derivatives._dispatch import dispatch
from gradlab._derivatives._graph import stand_ins, wants_graph
from gradlab._derivatives._keys import signature
from gradlab._derivatives._registry import DEADLINE, Operation, check_deadline
from gradlab._derivatives._taylor import check_shape, taylor
from gradlab._validate import check_bool, check_callable, check_int, check_tensor

__all__ = ["DERIVATIVE", "DerivativeProblem", "derivative"]

# Nested jvp costs at least 2^k; at k = 3 it is already far behind the other two, so "auto" does
# not time it above this order.
_FORWARD_MAX_ORDER = 2


@dataclass(frozen=True)
class DerivativeProblem:
    """A validated ``derivative`` call; ``keep``: whether the result may carry a graph."""

    f: Callable[[Any], Any]
    x: torch.Tensor
    order: int
    keep: bool

    def key(self) -> tuple:
        return (signature(self.x), self.order, self.keep)

    def devices(self) -> Sequence[torch.device]:
        return [self.x.device]


def _taylor(p: DerivativeProblem) -> torch.Tensor:
    out = taylor(p.f, p.x if p.keep else p.x.detach(), p.order)
    return out if p.keep else out.detach()


def _forward(p: DerivativeProblem) -> torch.Tensor:
    ones = torch.ones_like(p.x)
    g: Callable[[Any], Any] = p.f
    for _ in range(p.order):
        g = (lambda h: lambda z: torch.func.jvp(h, (z,), (ones,))[1])(g)
    out = check_shape(g(p.x if p.keep else p.x.detach()), p.x)  # grad mode: Operation.run
    return out if p.keep else out.detach()


def _reverse(p: DerivativeProblem) -> torch.Tensor:
    with torch.enable_grad():
        _, (z,), linked = stand_ins((p.x,), (0,), p.keep)
        y = check_shape(p.f(z), p.x)
        keep = wants_graph(p.keep, [y], [z], linked)
        timed = DEADLINE.get() != math.inf  # a measurement: each order's time is taken
        step = 0.0  # the last order's time (timed only)
        for k in range(p.order):
            # A timed candidate stops as soon as it cannot win: the orders left cost at least
            # the last one each (each differentiates a graph that holds the one before).
            check_deadline((p.order - k) * step)
            if not y.requires_grad:
                return torch.zeros_like(p.x)
            start = _registry.clock() if timed else 0.0
            (y,) = torch.autograd.grad(
                y.sum(), z, create_graph=keep or k < p.order - 1, allow_unused=True
            )
            if timed:
                step = _registry.clock() - start
            if y is None:
                return torch.zeros_like(p.x)
    return y if keep else y.detach()


def _heuristic(p: DerivativeProblem, result: Any) -> str:
    """``"taylor"`` (falling back to ``"reverse"`` per call where it cannot run ``f``)."""
    return "taylor"


def _candidates(p: DerivativeProblem) -> Sequence[str]:
    return [s for s in DERIVATIVE.names if s != "forward" or p.order <= _FORWARD_MAX_ORDER]


DERIVATIVE: Operation[DerivativeProblem] = Operation(
    name="derivative",
    strategies={"taylor": _taylor, "forward": _forward, "reverse": _reverse},
    first="taylor",
    heuristic=_heuristic,
    fallback={"taylor": "reverse", "forward": "reverse"},
    forward_ad=frozenset({"forward"}),
    candidates=_candidates,
    steps=frozenset({"reverse"}),
    one_step=lambda p: p.order == 1,  # one order: nothing to stop between (tried later)
)


def derivative(
    f: Callable[[Any], Any],
    x: torch.Tensor,
    *,
    order: int = 1,
    strategy: str = "auto",
    create_graph: bool | None = None,
) -> torch.Tensor:
    r"""k-th derivative of an elementwise function: :math:`\partial^k/\partial x^k \sum_i f(x)_i`.

    For elementwise ``f`` this is :math:`f^{(k)}(x_i)` at every element, a tensor of ``x``'s
    shape (``f`` must be elementwise: each output element depends only on the same input element;
    this is not checked, and a non-elementwise ``f`` gives a different quantity per strategy).

    Strategies (the same values and the same differentiability, different cost; the
    ``derivatives`` benchmark suite compares them, ``benchmarks/RESULTS.md``):

    ``"taylor"``
        Taylor-mode propagation of ``k + 1`` coefficients through each op, O(k^2) tensor ops per
        op at worst. Supported ops: ``+ - * /``, ``**``, ``exp``, ``expm1``, ``log``, ``log1p``,
        ``sin``, ``cos``, ``tan``, ``sinh``, ``cosh``, ``tanh``, ``sigmoid``, ``sqrt``,
        ``rsqrt``, ``reciprocal``, ``square``, ``erf``, ``atan``, ``softplus``, ``relu``,
        ``abs``, ``gelu``, ``silu`` (torch functions, tensor methods and
        ``torch.nn.functional``), with tensors or numbers as the other operand. Anything else (an
        op without a rule, comparisons, ``torch.where``, indexing, a custom
        ``autograd.Function``, code under ``torch.no_grad()``) raises ``ValueError`` naming it.
    ``"forward"``
        nested ``torch.func.jvp`` (work doubles per order).
    ``"reverse"``
        nested ``torch.autograd.grad(create_graph=True)``.
    ``"auto"`` (default)
        the heuristic ``"taylor"``, replaced by a measured strategy that is clearly faster
        (``"forward"`` is not timed above order 3); on every call where Taylor mode (or nested
        forward mode) cannot run ``f`` it falls back to ``"reverse"`` for that call. Cost of the
        first call, random functions, threads: ``help(gradlab.autotune)``.

    Args:
        f: an elementwise function of one tensor.
        x: where to differentiate (floating point).
        order: k >= 1.
        strategy: one of the names above.
        create_graph: ``None`` (default): the result carries a graph when grad mode is on and it
            depends on a tensor that requires grad (``x`` or a tensor ``f`` closes over, e.g. a
            PINN's parameters), as ``torch.func`` results do. ``True``: the same, also under
            ``torch.no_grad()``. ``False``: always detached (no graph is built).

    Returns:
        A tensor of ``x``'s shape and dtype.

    Raises:
        ValueError: ``order < 1``, unknown strategy (the message lists the valid ones), ``f`` not
            shape-preserving, something Taylor mode does not support with ``strategy="taylor"``.
        TypeError: ``x`` not a floating-point tensor, ``f`` not callable, ``create_graph`` not
            a bool or None.

    Example:
        >>> import gradlab as gl
        >>> x = torch.tensor([0.0, 1.0])
        >>> gl.derivative(torch.sin, x, order=3)  # -cos(x)
        tensor([-1.0000, -0.5403])
        >>> gl.derivative(lambda z: z**3, x, order=2, strategy="reverse")
        tensor([0., 6.])
        >>> gl.derivative(lambda z: torch.where(z > 0, z**3, z**2), x, order=2)  # falls back
        tensor([2., 6.])
    """
    DERIVATIVE.check(strategy)
    check_callable("derivative", "f", f, what="an elementwise function of one tensor")
    check_int("derivative", "order", order, minimum=1)
    check_tensor("derivative", "x", x, floating=True)
    if create_graph is not None:
        check_bool("derivative", "create_graph", create_graph, fix="Pass None, True or False")
    keep = torch.is_grad_enabled() if create_graph is None else create_graph
    return dispatch(DERIVATIVE, strategy, DerivativeProblem(f, x, order, keep))
