"""Gradient element histograms of GradientMonitor (``histogram_bins=``), for TensorBoard.

Design (the cheapest correct one): at the end of each diagnostic step's backward pass, every
monitored parameter's ``.grad`` (the accumulated gradient the optimizer will use) is reduced
on its device to ``histogram_bins`` equal-width bins over ``[min, max]`` of its elements
(``torch.histc`` on GPUs; on CPU, where ``histc`` is slow, the bin index and
``torch.bincount``) plus min, max, sum and sum of squares: ``O(P)`` work and ``bins + 4``
numbers per parameter, one synchronisation for the whole step (the bin ranges), free on CPU.
Only the latest such step is kept; :func:`~gradlab.hooks.write_tensorboard` hands the numbers
to ``SummaryWriter.add_histogram_raw``, so no gradient is ever copied to the host (the
alternative, ``add_histogram`` of each ``.grad``, copies every gradient and bins it in numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["GradHistogram", "HistogramSteps"]


class GradHistogram(NamedTuple):
    """A histogram of one parameter gradient's elements, in TensorBoard's raw form.

    The fields after ``step`` are the arguments of ``SummaryWriter.add_histogram_raw``.

    Attributes:
        step: the monitor's step it was taken at.
        min: smallest element. max: largest element. num: number of elements.
        sum: sum of the elements. sum_squares: sum of their squares.
        bucket_limits: the bin edges, ``bins + 1`` increasing numbers from ``min`` to ``max``
            (a constant gradient gets the range ``[c - 0.5, c + 0.5]``).
        bucket_counts: ``0`` for the left edge, then the count of each bin (elements equal to
            an inner edge count in the bin to its right, ``max`` in the last one).

    Example:
        >>> from gradlab.hooks import GradHistogram
        >>> h = GradHistogram(0, -1.0, 1.0, 4, 0.5, 2.0, [-1.0, 0.0, 1.0], [0.0, 1.0, 3.0])
        >>> h.num == sum(h.bucket_counts)
        True
    """

    step: int
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class HistogramSteps:
    """The histograms of the latest diagnostic step (tensors until read)."""

    def __init__(self, bins: int, names: Sequence[str]) -> None:
        self.bins = bins
        self._names = list(names)
        self._taken: tuple[int, list[str], list[float], list[torch.Tensor]] | None = None
        self._read: dict[str, GradHistogram] | None = None

    def take(self, step: int, params: list[torch.Tensor] | None) -> None:
        """End of a diagnostic step's backward: bin every monitored parameter's ``.grad``."""
        if params is None:
            return
        names, grads = [], []
        for n, p in zip(self._names, params):
            if p.grad is not None and p.grad.numel():
                names.append(n)
                grads.append(p.grad.detach().flatten())
        if not grads:
            self._taken, self._read = (step, [], [], []), None
            return
        with torch.no_grad():
            rows = []
            for g in grads:
                lo, hi = torch.aminmax(g)
                sq = torch.linalg.vector_norm(g, dtype=torch.float64).square()
                rows.append(torch.stack([lo.double(), hi.double(), g.sum(dtype=torch.float64), sq]))
            device = rows[0].device
            stats = torch.stack([r.to(device) for r in rows]).tolist()  # one synchronisation
            counts: list[torch.Tensor] = []
            kept: list[str] = []
            flat: list[float] = []
            for n, g, (lo, hi, s, sq) in zip(names, grads, stats):
                if not all(map(_finite, (lo, hi, s, sq))):
                    continue  # NaN/Inf: no histogram (the monitor's NaN tracing names it)
                a, b = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
                data = g if g.dtype in (torch.float32, torch.float64) else g.float()
                if data.device.type == "cpu":  # histc is slow on CPU: bin index, bincount
                    idx = ((data - a) * (self.bins / (b - a))).floor_().clamp_(0, self.bins - 1)
                    counts.append(torch.bincount(idx.long(), minlength=self.bins).double())
                else:  # no synchronisation beyond the ranges'
                    counts.append(torch.histc(data, bins=self.bins, min=a, max=b))
                kept.append(n)
                flat += [lo, hi, float(g.numel()), s, sq, a, b]
        self._taken, self._read = (step, kept, flat, counts), None

    def latest(self) -> dict[str, GradHistogram]:
        """``{parameter: GradHistogram}`` of the latest diagnostic step (empty before one)."""
        if self._read is None:
            out: dict[str, GradHistogram] = {}
            if self._taken is not None:
                step, names, flat, counts = self._taken
                host = [c.tolist() for c in counts]
                for k, n in enumerate(names):
                    lo, hi, num, s, sq, a, b = flat[7 * k : 7 * k + 7]
                    width = (b - a) / self.bins
                    limits = [a + i * width for i in range(self.bins)] + [b]
                    out[n] = GradHistogram(step, lo, hi, int(num), s, sq, limits, [0.0, *host[k]])
            self._read = out
        return dict(self._read)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
