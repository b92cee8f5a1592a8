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

import datetime
import gc
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
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


def run_gloo(
    body: Callable[..., None],
    args: tuple[Any, ...],
    store: str | os.PathLike[str],
    *,
    world: int = 2,
    fork_server: bool = False,
    seconds: int = 300,
) -> None:
    """``body(rank, *args)`` on ``world`` ranks of one gloo process group, then torn down.

    Each rank runs one torch thread and joins the group through a file store in the empty
    folder ``store`` (no TCP port to pick, so no race for one). ``body`` must be a module-level
    function that returns once its DDP/FSDP wrappers are unreachable: the group is destroyed
    after it returns (see the module docstring for why that order). ``fork_server``: start the
    ranks from a fork server that has imported torch and ``body``'s module once (faster than
    ``spawn`` where several tests start ranks; never a plain fork of this process, which may
    hold gloo threads of an earlier test). The test fails, never hangs, after ``seconds``.
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    method = "spawn"
    if fork_server and "forkserver" in mp.get_all_start_methods():
        method = "forkserver"
        mp.get_context(method).set_forkserver_preload(
            ["torch", "torch._dynamo", "torch.distributed", body.__module__]
        )
    rank_args = (body, world, os.fspath(store), args)
    run_ranks(_gloo_rank, rank_args, world, start_method=method, seconds=seconds)


def _gloo_rank(
    rank: int, body: Callable[..., None], world: int, store: str, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        body(rank, *args)
    finally:
        end_process_group()
