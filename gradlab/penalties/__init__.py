"""GAN gradient penalties: WGAN-GP, WGAN-LP, zero-centred GP, R1, R2, DRAGAN, path length.

Every penalty is a thin function over one core, :func:`input_gradient_norms` (per-sample L2
norms over every non-batch dimension, zero-safe, taken with ``torch.autograd.grad`` on fresh leaf
copies). Each ``*_penalty`` returns a scalar; each ``*_penalty_and_norms`` returns
``(penalty, norms)`` for logging without a second double-backward. See ``shared/API.md``.
"""

# ruff: noqa: I001  (one public name per import line, STYLE.md #1)
from __future__ import annotations

from gradlab.penalties._critic import PenaltyWithNorms
from gradlab.penalties._interpolate import interpolate
from gradlab.penalties._norms import input_gradient_norms
from gradlab.penalties.dragan import dragan_penalty
from gradlab.penalties.dragan import dragan_penalty_and_norms
from gradlab.penalties.gradient_penalty import gradient_penalty
from gradlab.penalties.gradient_penalty import gradient_penalty_and_norms
from gradlab.penalties.lazy import AdamHyperparameters
from gradlab.penalties.lazy import LazyRegularizer
from gradlab.penalties.path_length import PathLengthPenalty
from gradlab.penalties.path_length import PathLengthResult
from gradlab.penalties.path_length import path_length_penalty
from gradlab.penalties.r1 import r1_penalty
from gradlab.penalties.r1 import r1_penalty_and_norms
from gradlab.penalties.r1 import r2_penalty
from gradlab.penalties.r1 import r2_penalty_and_norms

__all__ = [
    "AdamHyperparameters",
    "LazyRegularizer",
    "PathLengthPenalty",
    "PathLengthResult",
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
]
