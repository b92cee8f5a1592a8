"""gather() under DistributedDataParallel: 2 gloo processes, each with its own samples (3 and 2:
ranks may differ), give the statistics of one process on the union of the batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradlab.per_sample import PerSampleGradients
from tests._distributed import run_gloo
from tests.per_sample._reference import reference_grads, stats_of

WORLD = 2
SIZES = (3, 2)
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n = sum(SIZES)
    return torch.randn(n, 2, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (n,), generator=g
    )


def _step(rank: int, out: str) -> None:
    ddp = nn.parallel.DistributedDataParallel(_model())
    x, y = _data()
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    with PerSampleGradients(ddp, stats=("grad", "sum_sq", "variance")) as ps:
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
    g = ps.gather()
    torch.save(
        {
            "norm": g.norm,
            "norm_by_param": g.norm_by_param,
            "sum_sq": g.sum_sq,
            "variance": g.variance,
            "grad": g.grad,
            "sizes": g.sizes,
            "local": ps.norm,
        },
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_gather_matches_one_process_on_the_union(tmp_path: Path) -> None:
    run_gloo(_step, (str(tmp_path),), tmp_path, world=WORLD)
    model = _model()
    x, y = _data()
    want = stats_of(reference_grads(model, F.cross_entropy, x, y))
    names = {n: f"module.{n}" for n, _ in model.named_parameters()}  # DDP's prefix
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["sizes"] == SIZES and got["local"].shape == (SIZES[rank],)
        torch.testing.assert_close(got["norm"], want["norm"], **TOL64)
        for stat in ("norm_by_param", "sum_sq", "variance", "grad"):
            mine = {n: got[stat][names[n]] for n in names}
            torch.testing.assert_close(mine, want[stat], **TOL64)


def test_gather_without_a_process_group() -> None:
    model = _model()
    x, y = _data()
    with PerSampleGradients(model) as ps:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no default process group"):
        ps.gather()
