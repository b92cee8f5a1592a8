"""Exact Hessian diagonal by Hessian backpropagation (issue 14; being written).

``exact_diagonal(loss_fn, params)`` returns the exact diagonal as a list of tensors shaped like
``params`` when the model has the supported structure, else ``None`` so that the caller falls back
to the Hessian-vector-product method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def exact_diagonal(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """Not yet supported for any structure: always ``None`` (the caller falls back)."""
    return None
