"""gradlab: analyse and use gradients on PyTorch.

Subpackages: :mod:`gradlab.penalties` (GAN gradient penalties), :mod:`gradlab.hooks` (gradient
capture and monitoring), :mod:`gradlab.testing` (property-based gradient checking). Derivatives,
curvature and freezing helpers live at the top level.
"""

from __future__ import annotations

from gradlab._errors import GradlabError, GraphError

__version__ = "0.1.0"

__all__ = ["GradlabError", "GraphError", "__version__"]
