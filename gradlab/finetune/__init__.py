"""gradlab.finetune: freezing and fine-tuning where frozen really means frozen.

``freeze`` sets ``requires_grad=False`` and ``.grad = None`` (so no optimizer created earlier can
move a frozen parameter through momentum, weight decay or Adam state) and keeps frozen BatchNorm
layers from updating their statistics; ``frozen`` does it temporarily; ``param_groups`` builds
optimizer groups with real learning rates (discriminative rates, layer decay, no decay on biases
and norms); ``GradualUnfreezing`` unfreezes stage by stage into a running optimizer and scheduler.
The common functions are also exported at the top level (``gl.freeze``, ``gl.frozen``, ...).
"""

from __future__ import annotations

from gradlab.finetune._batchnorm import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from gradlab.finetune._freeze import (
    freeze,
    frozen,
    trainable_parameters,
    unfreeze,
)
from gradlab.finetune._groups import (
    param_groups,
)
from gradlab.finetune._replace import (
    replace_module,
)
from gradlab.finetune._summary import (
    ParameterSummary,
    SummaryRow,
    parameter_summary,
)
from gradlab.finetune._unfreezing import (
    GradualUnfreezing,
)

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GradualUnfreezing",
    "ParameterSummary",
    "SummaryRow",
    "freeze",
    "frozen",
    "param_groups",
    "parameter_summary",
    "replace_module",
    "trainable_parameters",
    "unfreeze",
]
