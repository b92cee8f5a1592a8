"""Run ``loss_fn`` under a module's requested train/eval mode without leaving a trace.

BatchNorm in train mode updates its running statistics in place, and an in-place update bumps the
version counter of a tensor that the caller's own pending graph may have saved (``loss.backward()``
would then fail with "modified by an inplace operation"). So the caller's buffers are never
touched: for the duration of the forward pass each buffer is replaced in its module by a clone
(shared buffers stay shared), and the original tensor objects are put back afterwards, with their
values and version counters exactly as they were. The train/eval flags are restored too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def model_state(module: nn.Module | None, mode: str | None) -> Iterator[None]:
    """Set ``mode`` on ``module`` and shield its buffers while the block runs.

    ``mode``: ``"eval"``, ``"train"`` or ``None`` (leave the flags as they are). Without a module
    nothing is done.
    """
    if module is None:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    clones: dict[int, torch.Tensor] = {}
    for m, _ in flags:
        for name, b in m._buffers.items():
            if b is None:
                continue
            if id(b) not in clones:
                clones[id(b)] = b.detach().clone()
            swapped.append((m, name, b))
            m._buffers[name] = clones[id(b)]
    try:
        if mode is not None and any(m.training != (mode == "train") for m, _ in flags):
            module.train(mode == "train")
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag
        for m, name, b in swapped:
            m._buffers[name] = b
