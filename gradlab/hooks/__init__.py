"""gradlab.hooks: capture non-leaf gradients, monitor every layer, trace a NaN to its source.

Every tool is a context manager that removes all of its hooks on exit (exceptions included) and
keeps no reference to the model. :class:`GradientMonitor` also computes training diagnostics
(gradient noise scale, GSNR, the adaptive-sampling tests, update size, distance), drawn by
:func:`plot_diagnostics` and logged by :func:`write_tensorboard`.
"""

from gradlab.hooks._capture import CapturedGrads, capture_grads
from gradlab.hooks._dashboard import plot_diagnostics, write_tensorboard
from gradlab.hooks._diagnostics import DIAGNOSTICS
from gradlab.hooks._histograms import GradHistogram
from gradlab.hooks._monitor import GradientMonitor, LayerStats, NonfiniteSource, StepStats
from gradlab.hooks._plot import grad_flow_table, plot_grad_flow
from gradlab.hooks._retain import RetainedGrads, retain_grads

__all__ = [
    "DIAGNOSTICS",
    "CapturedGrads",
    "GradHistogram",
    "GradientMonitor",
    "LayerStats",
    "NonfiniteSource",
    "RetainedGrads",
    "StepStats",
    "capture_grads",
    "grad_flow_table",
    "plot_diagnostics",
    "plot_grad_flow",
    "retain_grads",
    "write_tensorboard",
]
