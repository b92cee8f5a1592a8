"""torch.distributed plumbing of the curvature operator: checks, seeds and sums across ranks.

Every rank runs the same sequence of collectives (the estimators take the same decisions on all
ranks because they decide on all-reduced numbers), so gloo (CPU) and nccl (GPU) both work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_group(fn: str) -> None:
    """``distributed=True`` needs an initialised default process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{fn}: distributed=True but torch.distributed has no initialised process group; call "
            f"torch.distributed.init_process_group(...) on every rank first, or pass "
            f"distributed=False"
        )


def check_same_shapes(fn: str, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """All ranks must take the Hessian w.r.t. parameters of the same names, shapes and dtype."""
    import torch.distributed as dist

    mine = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(names, params)]
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise ValueError(
                f"{fn}: distributed=True but the ranks have different parameters: rank 0 has "
                f"{everyone[0]} and rank {rank} has {theirs}; every rank must pass the same model "
                f"(its own shard of data only)"
            )


def shared_seed(generator: torch.Generator | None, distributed: bool) -> int:
    """One seed for the probes, drawn from ``generator`` (or the global RNG), rank 0's on all."""
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    if distributed:
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])  # type: ignore[call-overload]
    return seed


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (the same bits on every rank), and return it."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
