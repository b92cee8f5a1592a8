"""Buffering and flushing for GradientMonitor: one backward pass's gradients to one stats array.

:class:`PassBuffer` receives each hooked gradient (:meth:`PassBuffer.add`, from the gradient
hook) and turns it into the raw rows of :data:`gradlab.hooks._table.RAW` (sum of squares, L1,
max |g|; the element count is kept aside) by the cheapest route for its device and size:

* CPU float32/float64 with SciPy: three BLAS level-1 reads while the gradient is in cache
  (:func:`~gradlab.hooks._stats.blas_stats`), numbers kept on the host;
* other CPU gradients up to 64 KiB: ``|g|`` into a row of a warm per-size buffer
  (:class:`~gradlab.hooks._stats.CpuArena`), rows reduced together at the flush; larger ones
  reduced alone in the hook (four ops: cheaper than a row);
* other devices: a reference, reduced with fused ``_foreach_norm`` launches at the flush.

A flush runs when the buffered bytes exceed ``buffer_bytes`` and when the pass ends;
:meth:`PassBuffer.take` then hands the pass's (ROWS, R) statistics over, and :func:`to_host`
starts their copy to pinned host memory without blocking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradlab.hooks._engine import PassClock
from gradlab.hooks._stats import ROWS, CpuArena, blas_stats, stats_fused

__all__ = ["PassBuffer", "Pending", "to_host"]

_GROUPED_DEVICES = ("cpu",)  # |g| rows reduced row-wise (CpuArena); other devices: fused foreach
_ZERO = torch.zeros((), dtype=torch.float64)  # the statistics of an empty gradient
_CPU_BUFFER_BYTES = 4 * 2**20  # default buffer_bytes on CPU
# Larger CPU gradients are reduced alone in their hook, while they are in cache: four ops cost
# less than writing |g| to a row and reading the row three times later (see benchmarks/RESULTS.md).
_CPU_ALONE_BYTES = 2**16
_DEVICE_BUFFER_BYTES = 64 * 2**20  # default buffer_bytes on GPUs


@dataclass
class Pending:
    """A finished pass whose statistics are on their way to the host."""

    step: int
    slots: list[Any]
    numels: list[int]
    columns: list[int]  # slot index of each column of ``stats``
    stats: torch.Tensor  # (ROWS, R) raw rows; on the host once ``event`` is done
    event: Any
    scale: torch.Tensor | float | None  # the scaler's loss scale (None: no scaler or disabled)


class PassBuffer:
    """The gradients of the backward pass in progress, reduced to raw statistics."""

    __slots__ = (
        "__weakref__",
        "_arena",
        "_buf",
        "_buf_bytes",
        "_buf_idx",
        "_chunks",
        "_clock",
        "_columns",
        "_eager",
        "_eager_idx",
        "_host",
        "_host_idx",
        "buffer_bytes",
        "numels",
        "slots",
    )

    def __init__(self, buffer_bytes: int | None, clock: PassClock) -> None:
        self.buffer_bytes = buffer_bytes
        self._clock = clock
        self._arena = CpuArena()  # kept between passes: each step writes the same warm rows
        self._reset()

    def _reset(self) -> None:
        self.slots: list[Any] = []
        self.numels: list[int] = []
        self._buf: list[torch.Tensor] = []  # device gradients, by reference
        self._buf_idx: list[int] = []
        self._buf_bytes = 0
        self._eager: list[torch.Tensor] = []  # ROWS 0-dim statistics per CPU gradient done alone
        self._eager_idx: list[int] = []
        self._host: list[float] = []  # ROWS floats per CPU gradient done by BLAS
        self._host_idx: list[int] = []
        self._chunks: list[torch.Tensor] = []  # (ROWS, k) statistics flushed so far
        self._columns: list[int] = []

    def add(self, slot: Any, grad: torch.Tensor) -> None:
        """A gradient hook fired: record ``grad`` as ``slot`` (the hot path)."""
        self._clock.touch()
        g = grad.detach() if grad.requires_grad else grad
        index = len(self.slots)
        self.slots.append(slot)
        n = g.numel()
        self.numels.append(n)
        if g.is_cpu and "cpu" in _GROUPED_DEVICES:  # (is_cpu: cheaper than device.type)
            host = blas_stats(g)
            if host is not None:  # three BLAS reads while g is in cache, no torch op
                self._host += host
                self._host_idx.append(index)
                return
            limit = self.buffer_bytes
            if limit is None:
                limit = _CPU_BUFFER_BYTES
            nbytes = n * g.element_size()
            if n and nbytes <= limit and nbytes <= _CPU_ALONE_BYTES:
                self._arena.add(g, index)
                if self._arena.bytes > limit:
                    self.flush()
                return
            self._eager += self._arena.one(g) if n else [_ZERO] * ROWS
            self._eager_idx.append(index)
            return
        self._buf.append(g)
        self._buf_idx.append(index)
        self._buf_bytes += n * g.element_size()
        limit = self.buffer_bytes
        if self._buf_bytes > (_DEVICE_BUFFER_BYTES if limit is None else limit):
            self.flush()

    def flush(self) -> None:
        """Reduce what is buffered (CPU rows, device references) into chunks."""
        if self._arena.bytes:
            with torch.no_grad():
                chunks, order = self._arena.flush()
            self._chunks.extend(chunks)
            self._columns.extend(order)
        if not self._buf:
            return
        with torch.no_grad():
            self._chunks.append(torch.stack([torch.stack(c) for c in stats_fused(self._buf)]))
        self._columns.extend(self._buf_idx)
        self._buf, self._buf_idx, self._buf_bytes = [], [], 0

    def take(self) -> tuple[list[Any], list[int], torch.Tensor, list[int]] | None:
        """(slots, numels, (ROWS, R) stats, columns) of the pass, and a fresh buffer; or None."""
        self.flush()
        chunks, columns = self._chunks, self._columns
        if self._eager:
            chunks.append(torch.stack(self._eager).view(-1, ROWS).t())
            columns.extend(self._eager_idx)
        if self._host:
            # numpy builds the tensor from the list of floats faster than torch.tensor
            host = torch.from_numpy(np.array(self._host, dtype=np.float64))
            chunks.append(host.view(-1, ROWS).t())
            columns.extend(self._host_idx)
        slots, numels = self.slots, self.numels
        self._reset()
        if not slots:
            return None
        with torch.no_grad():
            device = chunks[0].device
            if any(t.device != device for t in chunks):
                chunks = [t.cpu() for t in chunks]
            stats = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        return slots, numels, stats, columns


def to_host(stats: torch.Tensor, scale: torch.Tensor | float | None) -> tuple[Any, ...]:
    """(host stats, event, scale): start the copy to the host without blocking.

    On CUDA the copy goes to pinned memory and an event marks its end (the engine may finish a
    pass on another thread/device: the copy and event are pinned to the statistics' device and
    its current stream); ``event`` is None where the copy is already done.
    """
    device = stats.device
    if device.type == "cpu":
        return stats, None, scale
    if device.type != "cuda":
        return stats.cpu(), None, scale
    with torch.no_grad(), torch.cuda.device(device):
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        if isinstance(scale, torch.Tensor) and scale.device == device:
            pinned = torch.empty(scale.shape, dtype=scale.dtype, pin_memory=True)
            scale = pinned.copy_(scale, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
    return host, event, scale
