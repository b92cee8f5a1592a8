"""gradlab.hooks: capture non-leaf gradients, monitor every layer, trace a NaN to its source.

Every tool is a context manager that removes all of its hooks on exit (exceptions included) and
keeps no reference to the model. See ../shared/API.md (gradlab.hooks).
"""

from gradlab.hooks._capture import CapturedGrads
from gradlab.hooks._capture import capture_grads
from gradlab.hooks._monitor import GradientMonitor
from gradlab.hooks._monitor import LayerStats
from gradlab.hooks._monitor import NonfiniteSource
from gradlab.hooks._monitor import StepStats
from gradlab.hooks._plot import grad_flow_table
from gradlab.hooks._plot import plot_grad_flow
from gradlab.hooks._retain import RetainedGrads
from gradlab.hooks._retain import retain_grads

__all__ = [
    "CapturedGrads",
    "GradientMonitor",
    "LayerStats",
    "NonfiniteSource",
    "RetainedGrads",
    "StepStats",
    "capture_grads",
    "grad_flow_table",
    "plot_grad_flow",
    "retain_grads",
]
