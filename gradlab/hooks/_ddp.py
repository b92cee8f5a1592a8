"""The gradient noise scale from DistributedDataParallel's all-reduce (McCandlish et al. 2018).

A DDP communication hook reads every gradient bucket twice: before the all-reduce (this rank's
local gradient, the mean over its ``B_small`` samples) and after it (the gradient averaged over
all ranks, ``B_big = world * B_small`` samples). Summed over buckets this gives, per step,
``|G_small|^2`` (averaged over the ranks by one extra scalar all-reduce, issued with the last
bucket) and ``|G_big|^2``, from which Appendix A.1's unbiased two-batch estimates follow:

    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    B_simple = S / |G|^2

No per-sample work: two norms of data the all-reduce reads anyway, and a 2-element all-reduce per
step. DDP accepts one communication hook per model and cannot remove it: the hook is registered
once per DDP model and, outside a monitor's context, is DDP's default averaging all-reduce
(``allreduce_hook``), so the gradients are exactly those of plain DDP either way.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils._pytree import tree_flatten

from gradlab.hooks._stats import blas_sum_sq

__all__ = ["DDPNoiseRecorder", "StepNorms", "attach", "two_batch_noise_scale"]


def two_batch_noise_scale(
    small_sq: float, big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """(S, |G|^2): McCandlish's unbiased two-batch estimates (Appendix A.1)."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return s, g2


class StepNorms:
    """One step's squared norms: this rank's local buckets, the reduced buckets, the batch."""

    __slots__ = ("batch", "local", "reduced", "work", "world")

    def __init__(self, batch: int, world: int) -> None:
        self.batch = batch
        self.world = world
        # per bucket: before the all-reduce (this rank), after it (the average over ranks)
        self.local: list[float | torch.Tensor] = []
        self.reduced: list[float | torch.Tensor] = []
        self.work: tuple[Any, torch.Tensor] | None = None  # the mean-over-ranks all-reduce

    def ingredients(self) -> dict[str, float]:
        """|G_small|^2 (mean over ranks), |G_big|^2, B_small, B_big; empty if incomplete."""
        if self.work is None or not self.reduced:
            return {}
        work, t = self.work
        work.wait()
        small_sq, b_sum = (float(x) for x in t.tolist())
        big_sq = float(_total(self.reduced))
        return {
            "ddp_small_sq": small_sq / self.world,
            "ddp_big_sq": big_sq,
            "ddp_b_small": b_sum / self.world,
            "ddp_b_big": b_sum,
        }


class DDPNoiseRecorder:
    """Collects the squared bucket norms of each step for one monitor (see :func:`attach`)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.batch = 0  # B_small of the step in progress (the DDP model's input batch)
        self.current = StepNorms(0, self.world)
        self.active = True  # record this step (False: DDP's plain averaging, e.g. every=k)

    def start_forward(self, args: Any, kwargs: Any) -> None:
        flat = tree_flatten((args, kwargs))[0]
        first = next((t for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None:
            self.batch = int(first.shape[0])

    def take(self) -> StepNorms:
        """The norms of the step that just ended; a fresh record starts."""
        done, self.current = self.current, StepNorms(self.batch, self.world)
        return done

    def bucket(self, bucket: Any) -> Any:
        norms = self.current
        norms.batch = self.batch
        buf = bucket.buffer()
        with torch.no_grad():
            norms.local.append(_sum_sq(buf))
            if bucket.is_last():
                local = _total(norms.local)
                t = torch.stack(
                    [
                        torch.as_tensor(local, dtype=torch.float64, device=buf.device),
                        buf.new_tensor(float(norms.batch), dtype=torch.float64),
                    ]
                )
                norms.work = (dist.all_reduce(t, group=self.group, async_op=True), t)
        fut = allreduce_hook(self.group, bucket)

        def reduced(f: Any) -> torch.Tensor:
            out = f.value()
            with torch.no_grad():
                norms.reduced.append(_sum_sq(out))
            return out

        return fut.then(reduced)


def _sum_sq(buf: torch.Tensor) -> float | torch.Tensor:
    """``sum(buf**2)``: one BLAS dot for a CPU bucket (a float; faster than ``vector_norm``
    there), else a float64 0-dim tensor from the norm in the bucket's dtype (a
    float64 norm of a float32 bucket would copy it). Accumulated in the bucket's precision
    either way."""
    sq = blas_sum_sq(buf)
    if sq is not None:
        return sq
    return torch.linalg.vector_norm(buf).to(torch.float64).square()


def _total(values: list[float | torch.Tensor]) -> float | torch.Tensor:
    """The sum of per-bucket squared norms: a float when every bucket gave one (no torch op),
    else a 0-dim tensor on the buckets' device (no host sync)."""
    if all(isinstance(v, float) for v in values):
        return math.fsum(values)  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).sum()


class _HookState:
    """The state DDP keeps with the hook: the recorder of the active monitor, if any."""

    __slots__ = ("__weakref__", "group", "recorder")

    def __init__(self, group: Any) -> None:
        self.group = group
        self.recorder: weakref.ref[DDPNoiseRecorder] | None = None


def _comm_hook(state, bucket):  # type: ignore[no-untyped-def]
    # No annotations: DDP compares them with dist.GradBucket, and this module's are strings.
    recorder = None if state.recorder is None else state.recorder()
    if recorder is None or not recorder.active:
        return allreduce_hook(state.group, bucket)  # type: ignore[arg-type]
    return recorder.bucket(bucket)  # type: ignore[no-any-return]


_STATES: weakref.WeakKeyDictionary[Any, _HookState] = weakref.WeakKeyDictionary()


def attach(fn: str, ddp: Any, recorder: DDPNoiseRecorder | None) -> None:
    """Route ``ddp``'s all-reduce through ``recorder`` (None: back to plain averaging)."""
    state = _STATES.get(ddp)
    if state is None:
        if recorder is None:
            return
        state = _HookState(getattr(ddp, "process_group", None))
        try:
            ddp.register_comm_hook(state, _comm_hook)
        except RuntimeError as e:
            raise RuntimeError(
                f"{fn}: diagnostics 'ddp_noise_scale' needs DDP's communication hook, but this "
                f"DistributedDataParallel model already has one ({e}). Drop 'ddp_noise_scale' "
                "or the other communication hook"
            ) from None
        _STATES[ddp] = state
    state.recorder = None if recorder is None else weakref.ref(recorder)
