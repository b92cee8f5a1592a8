"""gradlab: analyse and use gradients on PyTorch.

Derivatives (``gl.grad``, ``gl.jacobian``, ``gl.hessian``, ``gl.hvp``, ...) live at the top level.
Subpackages: :mod:`gradlab.curvature` (Hessian trace, diagonal, eigenvalues, spectrum; the GGN,
Fisher and KFAC operators), :mod:`gradlab.penalties` (GAN gradient penalties),
:mod:`gradlab.hooks` (gradient capture, monitoring and training diagnostics),
:mod:`gradlab.per_sample` (per-sample gradients and their statistics), :mod:`gradlab.finetune`
(freezing and fine-tuning), :mod:`gradlab.testing` (property-based gradient checking). The
common curvature and fine-tuning functions are re-exported at the top level
(``gl.hessian_trace``, ``gl.freeze``, ...); the other subpackages are imported by name
(``from gradlab.hooks import GradientMonitor``).
"""

from __future__ import annotations

# First: importing _compat refuses a torch older than the supported minimum with a clear
# ImportError, before the imports below fail on an API it lacks.
from gradlab import _compat  # noqa: F401
from gradlab._derivatives import (
    HVP,
    JVP,
    VJP,
    FunctionalModule,
    autotune,
    autotune_choices,
    backward,
    clear_autotune_cache,
    derivative,
    functional,
    grad,
    hessian,
    hvp,
    is_autotune_enabled,
    jacobian,
    jvp,
    set_autotune,
    vjp,
)
from gradlab._errors import GradlabError, GraphError
from gradlab.curvature import (
    Eigenpairs,
    Spectrum,
    fisher_operator,
    ggn_diagonal,
    ggn_operator,
    hessian_diagonal,
    hessian_eigenvalues,
    hessian_operator,
    hessian_spectrum,
    hessian_trace,
    hessian_trace_by_block,
    kfac_operator,
)
from gradlab.finetune import (
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

__all__ = [
    "HVP",
    "JVP",
    "VJP",
    "Eigenpairs",
    "FunctionalModule",
    "GradlabError",
    "GradualUnfreezing",
    "GraphError",
    "Spectrum",
    "__version__",
    "autotune",
    "autotune_choices",
    "backward",
    "clear_autotune_cache",
    "derivative",
    "fisher_operator",
    "freeze",
    "frozen",
    "functional",
    "ggn_diagonal",
    "ggn_operator",
    "grad",
    "hessian",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hessian_trace_by_block",
    "hvp",
    "is_autotune_enabled",
    "jacobian",
    "jvp",
    "kfac_operator",
    "param_groups",
    "parameter_summary",
    "replace_module",
    "set_autotune",
    "trainable_parameters",
    "unfreeze",
    "vjp",
]
