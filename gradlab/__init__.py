"""gradlab: analyse and use gradients on PyTorch.

Subpackages: :mod:`gradlab.penalties` (GAN gradient penalties), :mod:`gradlab.hooks` (gradient
capture and monitoring), :mod:`gradlab.testing` (property-based gradient checking). Derivatives,
curvature and freezing helpers live at the top level.
"""

from __future__ import annotations

from gradlab._errors import GradlabError, GraphError
from gradlab.freeze import (
    GradualUnfreezing,
    freeze,
    frozen,
    param_groups,
    parameter_summary,
    replace_module,
    trainable_parameters,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = ["GradlabError", "GraphError", "__version__"]
__all__ += [
    "GradualUnfreezing",
    "freeze",
    "frozen",
    "param_groups",
    "parameter_summary",
    "replace_module",
    "trainable_parameters",
    "unfreeze",
]
