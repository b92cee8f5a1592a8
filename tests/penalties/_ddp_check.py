"""The DistributedDataParallel check every registered penalty must pass (2 gloo processes).

Each rank gets half of the batch and takes two penalty-only steps (StyleGAN2's lazy
regularization step: the penalty alone, backward, SGD step) through DDP. DDP averages the
gradients over ranks, so each rank must hold the gradient of the mean of the two halves'
penalties with the same draws (int seeds per rank and step), computed in one process without
DDP. A penalty whose gradient misses a parameter (R1 never reaches the last bias) fails the second
step with "Expected to have finished reduction" unless it sends a zero gradient into the
critic's outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradlab.penalties import PenaltyEntry
from tests._distributed import run_gloo
from tests.penalties._shared import call

WORLD = 2
HALF = 3
STEPS = 2
LR = 0.05


def _critic() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    real = torch.randn(STEPS, WORLD * HALF, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(STEPS, WORLD * HALF, 4, generator=g, dtype=torch.float64)
    return real, fake


def _seed(step: int, rank: int) -> int:
    return 100 + 10 * step + rank


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """Each parameter's gradient; zeros where none arrived (R1 never reaches the last bias)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _cases(entries: list[PenaltyEntry]) -> list[tuple[PenaltyEntry, str]]:
    return [(e, m) for e in entries for m in e.methods]


def _steps(rank: int, entries: list[PenaltyEntry], out: str) -> None:
    """One rank's steps (its DDP wrappers are freed when it returns, before the teardown)."""
    real, fake = _data()
    mine = slice(rank * HALF, (rank + 1) * HALF)
    result = {}
    for entry, method in _cases(entries):
        critic = _critic()
        ddp = nn.parallel.DistributedDataParallel(critic)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        steps = []
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            penalty = call(
                entry, ddp, real[step, mine], fake[step, mine], method, _seed(step, rank)
            )
            penalty.backward()
            steps.append(_grads(critic))
            opt.step()
        result[f"{entry.name}/{method}"] = steps
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _reference(entry: PenaltyEntry, method: str) -> list[list[torch.Tensor]]:
    """One process, no DDP: the mean of the two halves' penalties, same draws."""
    critic = _critic()
    opt = torch.optim.SGD(critic.parameters(), lr=LR)
    real, fake = _data()
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        halves = [
            call(entry, critic, real[step, h], fake[step, h], method, _seed(step, rank))
            for rank, h in enumerate(slice(r * HALF, (r + 1) * HALF) for r in range(WORLD))
        ]
        (sum(halves) / WORLD).backward()
        steps.append(_grads(critic))
        opt.step()
    return steps


def check_ddp(entries: list[PenaltyEntry], tmp_path: Path) -> None:
    """Run the DDP steps of every entry and method on 2 ranks and compare with one process."""
    run_gloo(_steps, (entries, str(tmp_path)), tmp_path, world=WORLD)
    for entry, method in _cases(entries):
        want = _reference(entry, method)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")[f"{entry.name}/{method}"]
            assert len(got) == STEPS
            for step, (g_step, w_step) in enumerate(zip(got, want)):
                for p, (g, w) in enumerate(zip(g_step, w_step)):
                    torch.testing.assert_close(
                        g,
                        w,
                        rtol=1e-10,
                        atol=1e-12,
                        msg=f"{entry.name} {method} rank {rank} step {step} param {p}",
                    )
