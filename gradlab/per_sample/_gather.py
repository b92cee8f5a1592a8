"""PerSampleGradients.gather(): the statistics of the global batch under DistributedDataParallel.

Each rank's statistics are of its own samples. Gathered: norms (and per-sample gradients)
concatenated in rank order (ranks may hold different numbers of samples); ``sum_sq`` summed;
the variance from the global sums, ``(1/N) sum_i g_i^2 - ((1/N) sum_i g_i)^2`` with ``N`` the
global batch size, exactly the variance of the union (up to rounding), not a mean of variances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GatheredStats", "gather"]


@dataclass(frozen=True)
class GatheredStats:
    """Per-sample statistics of the global batch (every rank's samples, in rank order).

    Attributes:
        batch_size: ``N``, the samples of every rank together.
        sizes: the samples of each rank, in rank order.
        norm: ``(N,)`` per-sample gradient norms.
        norm_by_param: ``{name: (N,)}``.
        sum_sq: ``{name: p.shape}`` ``sum_i g_i**2`` over the ``N`` samples, or ``None`` when
            ``"sum_sq"`` and ``"variance"`` were not asked for.
        variance: ``{name: p.shape}`` over the ``N`` samples, or ``None`` when ``"variance"``
            was not asked for.
        grad: ``{name: (N, *p.shape)}``, or ``None`` when ``"grad"`` was not asked for.

    Example:
        Returned by :meth:`PerSampleGradients.gather`, which every rank calls after its backward
        pass. Here a group of one rank (in a real run, ``torchrun`` starts one process per rank):

        >>> import torch.distributed as dist
        >>> from torch import nn
        >>> from gradlab.per_sample import PerSampleGradients
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
        >>> with PerSampleGradients(model, stats=("norm", "variance")) as ps:
        ...     nn.functional.mse_loss(model(x), y).backward()
        >>> stats = ps.gather()
        >>> stats.batch_size, stats.sizes, tuple(stats.norm.shape), sorted(stats.norm_by_param)
        (4, (4,), (4,), ['bias', 'weight'])
        >>> torch.allclose(stats.variance["weight"], ps.variance["weight"]), stats.grad
        (True, None)
        >>> dist.destroy_process_group()
    """

    batch_size: int
    sizes: tuple[int, ...]
    norm: torch.Tensor
    norm_by_param: dict[str, torch.Tensor]
    sum_sq: dict[str, torch.Tensor] | None
    variance: dict[str, torch.Tensor] | None
    grad: dict[str, torch.Tensor] | None


def _cat(t: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """All-gather ``t (b, ...)`` whose ``b`` differs by rank; concatenate in rank order."""
    big = max(sizes)
    padded = torch.zeros(big, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather(ps: Any, group: Any = None) -> GatheredStats:
    """See :meth:`PerSampleGradients.gather` (``ps``; typed ``Any``: importing the engine's
    module here, even for type checking only, would make an import cycle)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PerSampleGradients.gather: no default process group; call "
            "torch.distributed.init_process_group first (or read the statistics directly "
            "in one process)"
        )
    ps._finalize()
    names = list(ps._params)
    b = ps.batch_size
    norms_sq = ps._norms_sq()
    ref = next(iter(norms_sq.values()))
    sizes_t = [
        torch.zeros(1, dtype=torch.long, device=ref.device)
        for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(sizes_t, torch.tensor([b], device=ref.device), group=group)
    sizes = [int(s.item()) for s in sizes_t]
    n = sum(sizes)
    norm_sq = _cat(torch.stack([norms_sq[k] for k in names], 1), sizes, group)  # (N, P)
    by_param = {k: norm_sq[:, j].sqrt() for j, k in enumerate(names)}
    sum_sq = variance = grad = None
    if ps._moments:
        sum_sq = {}
        for k in names:
            sum_sq[k] = ps._sum_sq[k].clone()
            dist.all_reduce(sum_sq[k], group=group)
    if "variance" in ps._stats:
        variance = {}
        for k in names:
            total = ps._sum[k].clone()
            dist.all_reduce(total, group=group)
            assert sum_sq is not None
            variance[k] = (sum_sq[k] / n - (total / n).square()).clamp_min(0)
    if "grad" in ps._stats:
        grad = {k: _cat(ps._grad[k], sizes, group) for k in names}
    return GatheredStats(
        batch_size=n,
        sizes=tuple(sizes),
        norm=norm_sq.sum(1).sqrt(),
        norm_by_param=by_param,
        sum_sq=sum_sq,
        variance=variance,
        grad=grad,
    )
