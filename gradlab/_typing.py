"""Type aliases used across gradlab's public signatures (one place, see STYLE.md #6)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch

Tensor: TypeAlias = torch.Tensor
TensorOrTensors: TypeAlias = torch.Tensor | Sequence[torch.Tensor]
Params: TypeAlias = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
PyTree: TypeAlias = Any
Device: TypeAlias = str | torch.device
TensorFn: TypeAlias = Callable[..., Any]

__all__ = ["Device", "Params", "PyTree", "Tensor", "TensorFn", "TensorOrTensors"]

# gradlab.finetune: what freeze/unfreeze/frozen accept as targets (name glob, module type, module
# object, or a parameter of the model).
FreezeTarget: TypeAlias = str | type[torch.nn.Module] | torch.nn.Module | torch.Tensor
__all__ += ["FreezeTarget"]
