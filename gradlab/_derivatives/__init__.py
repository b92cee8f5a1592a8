"""Derivatives: ``grad``/``backward``, ``jacobian``/``hessian``/``hvp``/``vjp``/``jvp``,
``derivative``, ``functional`` and the ``strategy="auto"`` machinery. Private: the public names
are re-exported by :mod:`gradlab`.

:data:`OPERATIONS` maps each operation with strategies to its registry
(:class:`~gradlab._derivatives._registry.Operation`); tests and the ``derivatives`` benchmark
suite iterate over it.
"""

from __future__ import annotations

from gradlab._derivatives._autotune import (
    autotune,
    autotune_choices,
    clear_autotune_cache,
    is_autotune_enabled,
    set_autotune,
)
from gradlab._derivatives._derivative import DERIVATIVE, derivative
from gradlab._derivatives._grad import backward, grad
from gradlab._derivatives._hessian import HESSIAN, hessian
from gradlab._derivatives._jacobian import JACOBIAN, jacobian
from gradlab._derivatives._module import FunctionalModule, functional
from gradlab._derivatives._products import HVP, HVP_OP, JVP, VJP, hvp, jvp, vjp
from gradlab._derivatives._registry import Operation

OPERATIONS: dict[str, Operation] = {
    "jacobian": JACOBIAN,
    "hessian": HESSIAN,
    "hvp": HVP_OP,
    "derivative": DERIVATIVE,
}

__all__ = [
    "DERIVATIVE",
    "HESSIAN",
    "HVP",
    "HVP_OP",
    "JACOBIAN",
    "JVP",
    "OPERATIONS",
    "VJP",
    "FunctionalModule",
    "autotune",
    "autotune_choices",
    "backward",
    "clear_autotune_cache",
    "derivative",
    "functional",
    "grad",
    "hessian",
    "hvp",
    "is_autotune_enabled",
    "jacobian",
    "jvp",
    "set_autotune",
    "vjp",
]
