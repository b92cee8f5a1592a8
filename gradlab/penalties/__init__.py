"""GAN gradient penalties: WGAN-GP, WGAN-LP, zero-centred GP, R1, R2, DRAGAN, path length.

Every exact penalty is a thin front end over one core (``_core.py``: per-sample L2 norms of the
critic's input gradients over every non-batch dimension, zero-safe, taken with
``torch.autograd.grad`` on fresh leaf copies, then one reduction). R1/R2 also have a
finite-difference estimator (``method="finite-difference"``) that needs no double backward.
Each ``*_penalty`` returns a scalar; the one way to get the per-sample norms for logging is its
``*_penalty_and_norms`` twin, which returns ``(penalty, norms)`` at no extra cost (a twin rather
than a ``return_norms=`` flag: one return structure per call signature, see
:class:`PenaltyWithNorms`).

:data:`PENALTIES` lists the critic penalties (name -> :class:`PenaltyEntry`: the function, the
sample arguments it takes, whether it is zero-centred, its methods); each penalty module registers
its own entry, and the cross-cutting tests and the benchmark loop over it. Adding a penalty is
its module (a front end over ``_core.py`` ending in :func:`register_penalty`), one import line
here, and its test.
"""

# ruff: noqa: I001  (one public name per import line, STYLE.md #1)
from __future__ import annotations

from gradlab.penalties._core import PenaltyWithNorms
from gradlab.penalties._registry import PENALTIES
from gradlab.penalties._registry import PenaltyEntry
from gradlab.penalties._registry import register_penalty
from gradlab.penalties._interpolate import interpolate
from gradlab.penalties._norms import input_gradient_norms
from gradlab.penalties.dragan import dragan_penalty
from gradlab.penalties.dragan import dragan_penalty_and_norms
from gradlab.penalties.lazy import AdamHyperparameters
from gradlab.penalties.lazy import LazyRegularizer
from gradlab.penalties.path_length import PathLengthPenalty
from gradlab.penalties.path_length import PathLengthResult
from gradlab.penalties.path_length import path_length_penalty
from gradlab.penalties.r1 import r1_penalty
from gradlab.penalties.r1 import r1_penalty_and_norms
from gradlab.penalties.r2 import r2_penalty
from gradlab.penalties.r2 import r2_penalty_and_norms
from gradlab.penalties.wgan_gp import gradient_penalty
from gradlab.penalties.wgan_gp import gradient_penalty_and_norms

__all__ = [
    "PENALTIES",
    "AdamHyperparameters",
    "LazyRegularizer",
    "PathLengthPenalty",
    "PathLengthResult",
    "PenaltyEntry",
    "PenaltyWithNorms",
    "dragan_penalty",
    "dragan_penalty_and_norms",
    "gradient_penalty",
    "gradient_penalty_and_norms",
    "input_gradient_norms",
    "interpolate",
    "path_length_penalty",
    "r1_penalty",
    "r1_penalty_and_norms",
    "r2_penalty",
    "r2_penalty_and_norms",
    "register_penalty",
]
