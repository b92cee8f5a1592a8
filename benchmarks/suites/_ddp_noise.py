"""The DDP noise scale's communication hook against a plain DDP step: 2 gloo processes.

Each rank holds three DistributedDataParallel copies of the same MLP: one plain (DDP's own
averaging all-reduce in C++, no communication hook), one with DDP's own averaging as a Python
communication hook (``allreduce_hook``: the mechanism any such hook pays for, doing nothing
else), one whose all-reduce goes through
:mod:`gradlab.hooks._ddp`'s recorder (a norm of each bucket before and after the all-reduce, and
a 2-number all-reduce of the local squared norm and the batch size), read every step as the
monitor does. A step is ``zero_grad``, forward, ``backward`` (the all-reduce) and, for the
hooked copy, the recorder's ingredients (which waits for its small all-reduce). They run in
alternating runs of :data:`BLOCK` steps (the first :data:`SKIP` not recorded), in the same
seeded order on both ranks (every collective must match); rank 0's times are returned.

Used by the ``hooks`` suite at the default and full sizes (two processes take seconds to
start); run alone with ``python -m benchmarks.suites._ddp_noise``.
"""

from __future__ import annotations

import datetime
import gc
import os
import random
import tempfile
import time
from typing import Any

import torch
from torch import nn

__all__ = ["BLOCK", "SKIP", "measure"]

BLOCK, SKIP = 8, 2
_WORLD = 2


def _mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _steps(rank: int, turns: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from gradlab.hooks._ddp import DDPNoiseRecorder, attach

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = _mlp(10, 256)

    def copy() -> nn.parallel.DistributedDataParallel:
        ddp = nn.parallel.DistributedDataParallel(_mlp(10, 256))
        ddp.module.load_state_dict(net.state_dict())
        return ddp

    plain, floor, hooked = nn.parallel.DistributedDataParallel(net), copy(), copy()
    floor.register_comm_hook(None, allreduce_hook)  # DDP's own averaging, as a Python hook
    recorder = DDPNoiseRecorder(hooked.process_group)
    attach("benchmark", hooked, recorder)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(rank))

    def step(ddp: nn.parallel.DistributedDataParallel) -> None:
        ddp.zero_grad(set_to_none=True)
        ddp(x).square().mean().backward()

    def hooked_step() -> None:
        recorder.start_forward((x,), {})
        step(hooked)
        recorder.take().ingredients()  # what a monitor reads each step (waits for it)

    fns = {
        "ddp_plain": lambda: step(plain),
        "ddp_hook_floor": lambda: step(floor),
        "ddp_noise_hook": hooked_step,
    }
    for _ in range(3):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    turn_medians: dict[str, list[float]] = {n: [] for n in fns}
    cpu_medians: dict[str, list[float]] = {n: [] for n in fns}
    shuffle = random.Random(0)  # the same order on both ranks
    for _ in range(turns):
        order = list(fns)
        shuffle.shuffle(order)
        for name in order:
            run, cpu = [], []
            for k in range(BLOCK):
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name]()
                if k >= SKIP:
                    run.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            times[name].extend(run)
            run.sort()
            cpu.sort()
            turn_medians[name].append(run[len(run) // 2])
            cpu_medians[name].append(cpu[len(cpu) // 2])
    dist.barrier()
    if rank == 0:
        torch.save({"times": times, "turns": turn_medians, "cpu_turns": cpu_medians}, out)


def _worker(rank: int, turns: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=_WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        _steps(rank, turns, os.path.join(tmp, "times.pt"))  # wrappers freed on return
    finally:
        gc.collect()
        dist.destroy_process_group()


def measure(turns: int = 20, seconds: int = 300) -> dict[str, Any]:
    """Per-call times of rank 0 (``"times"``), per-turn medians (``"turns"``) and per-turn
    medians of rank 0's CPU time (``"cpu_turns"``: its process, gloo's threads included) for
    ``"ddp_plain"`` and ``"ddp_noise_hook"``; raises if the processes fail or time out."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker, args=(turns, tmp), nprocs=_WORLD, join=False, start_method="spawn"
        )
        try:
            deadline = time.monotonic() + seconds
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DDP benchmark: 2 gloo processes ran over {seconds} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return torch.load(os.path.join(tmp, "times.pt"))


if __name__ == "__main__":
    import statistics

    res = measure()
    for name, t in res["times"].items():
        print(f"{name}: median {statistics.median(t) * 1e3:.2f} ms")
    for name in ("ddp_hook_floor", "ddp_noise_hook"):  # medians over turns, to plain DDP
        wall, cpu = (
            statistics.median(h / p for h, p in zip(res[key][name], res[key]["ddp_plain"]))
            for key in ("turns", "cpu_turns")
        )
        print(f"{name}: ratio {wall:.3f}, CPU-time ratio {cpu:.3f}")
