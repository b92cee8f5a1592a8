"""FSDP (1 and 2): exact penalties are refused with the fix; finite-difference R1 runs through it.

2 gloo processes on CPU, each with half of the batch. FSDP averages gradients over ranks and each
loss is a mean over the rank's half, so after backward every rank must hold the gradient of the
single-process loss over the combined batch with the same epsilons, computed below without FSDP.
Every registered penalty's exact method is refused: FSDP does not support double backward (with
FSDP 1 NO_SHARD the gradients come out silently wrong; full sharding and FSDP2 fail inside
backward).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradlab.penalties import PENALTIES
from tests._distributed import run_gloo
from tests.penalties._shared import check_fsdp_refused

WORLD = 2
HALF = 3
GAMMA = 4.0
SIGMA = 0.05
KINDS = ["fsdp1-no-shard", "fsdp1-full-shard", "fsdp2"]


def _critic() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _real() -> torch.Tensor:
    return torch.randn(WORLD * HALF, 4, generator=torch.Generator().manual_seed(11)).double()


def _seed(rank: int, step: int) -> int:
    return 100 + 10 * step + rank


def _wrap(kind: str, critic: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard

    if kind == "fsdp2":
        fully_shard(critic)
        return critic
    strategy = (
        ShardingStrategy.NO_SHARD if kind == "fsdp1-no-shard" else ShardingStrategy.FULL_SHARD
    )
    return FullyShardedDataParallel(
        critic, sharding_strategy=strategy, use_orig_params=True, device_id=torch.device("cpu")
    )


def _full_grads(kind: str, model: nn.Module) -> list[torch.Tensor]:
    if kind == "fsdp2":
        return [p.grad.full_tensor().clone() for p in model.parameters()]
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        return [p.grad.clone() for p in model.parameters()]


def _steps(rank: int, out: str) -> None:
    """One rank's steps (its FSDP wrappers are freed when it returns, before the teardown)."""
    from gradlab.penalties import PENALTIES, r1_penalty
    from tests.penalties._shared import call

    result: dict[str, object] = {}
    x = _real()[rank * HALF : (rank + 1) * HALF]
    for kind in KINDS:
        model = _wrap(kind, _critic())
        errors = {}
        for entry in PENALTIES.values():  # every registered penalty's exact method
            try:
                call(entry, model, x, x.flip(0))
                errors[entry.name] = "no error"
            except Exception as e:  # the type is checked in the test
                errors[entry.name] = f"{type(e).__name__}: {e}"
        result[f"{kind}/errors"] = errors
        # adversarial loss + finite-difference R1 on the same forward (outputs=)
        xl = x.clone().requires_grad_(True)
        d = model(xl)
        gen = torch.Generator().manual_seed(_seed(rank, 0))
        r1 = r1_penalty(
            model,
            xl,
            gamma=GAMMA,
            outputs=d,
            method="finite-difference",
            sigma=SIGMA,
            generator=gen,
        )
        (nn.functional.softplus(-d).mean() + r1).backward()
        result[f"{kind}/adversarial+r1"] = _full_grads(kind, model)
        model.zero_grad(set_to_none=True)
        # a penalty-only (lazy) finite-difference R1 step, the critic called on its own
        gen = torch.Generator().manual_seed(_seed(rank, 1))
        r1_penalty(
            model, x, gamma=GAMMA, method="finite-difference", sigma=SIGMA, generator=gen
        ).backward()
        result[f"{kind}/r1-only"] = _full_grads(kind, model)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _fd_r1(critic: nn.Module, x: torch.Tensor, d: torch.Tensor, step: int) -> torch.Tensor:
    """The finite-difference R1 of the combined batch, each half with its rank's epsilons."""
    eps = torch.cat(
        [
            torch.randn(
                HALF, 4, dtype=x.dtype, generator=torch.Generator().manual_seed(_seed(r, step))
            )
            for r in range(WORLD)
        ]
    )
    diff = (critic(x + SIGMA * eps) - d).squeeze(1)
    return GAMMA / 2 * (diff**2 / SIGMA**2).mean()


def _reference() -> dict[str, list[torch.Tensor]]:
    critic = _critic()
    x = _real()
    d = critic(x)
    loss = nn.functional.softplus(-d).mean() + _fd_r1(critic, x, d, 0)
    adversarial = list(torch.autograd.grad(loss, list(critic.parameters())))
    only = torch.autograd.grad(_fd_r1(critic, x, critic(x), 1), list(critic.parameters()))
    return {"adversarial+r1": adversarial, "r1-only": list(only)}


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)
def test_fsdp_exact_refused_and_finite_difference_matches_single_process(tmp_path: Path) -> None:
    run_gloo(_steps, (str(tmp_path),), tmp_path, world=WORLD)
    reference = _reference()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in KINDS:
            label = "FullyShardedDataParallel (FSDP 1)" if kind != "fsdp2" else "fully_shard"
            errors = result[f"{kind}/errors"]
            assert set(errors) == set(PENALTIES)
            for entry in PENALTIES.values():
                fn, message = entry.fn.__name__, errors[entry.name]
                assert message.startswith(f"GraphError: {fn}: critic is wrapped with {label}")
                assert "does not support double backward" in message
                if "finite-difference" in entry.methods:
                    assert f"{fn}(..., method='finite-difference')" in message
                else:
                    assert "DistributedDataParallel instead of FSDP" in message
            for step in ("adversarial+r1", "r1-only"):
                got, want = result[f"{kind}/{step}"], reference[step]
                assert len(got) == len(want) == 4
                for p, (g, w) in enumerate(zip(got, want)):
                    torch.testing.assert_close(
                        g, w, rtol=1e-10, atol=1e-12, msg=f"{kind} {step} rank {rank} param {p}"
                    )


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in PENALTIES.values()])
def test_fsdp2_submodule_is_refused_by_name(entry):
    """A critic with one fully_shard-ed submodule (needs no process group to detect)."""
    check_fsdp_refused(entry)
