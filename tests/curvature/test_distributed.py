"""distributed=True: two gloo processes, each with its own shard, equal one process on the union."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradlab as gl
from tests._distributed import run_gloo
from tests.curvature._helpers import dataset_problem

# rank 0 holds 7 samples in two batches, rank 1 holds 9 in one: unequal sample counts
SHARDS = {0: [(0, 5), (5, 7)], 1: [(7, 16)]}


def _compute(loss_fn, model, data, seeds, **kw):
    return {
        "trace-exact": gl.hessian_trace(loss_fn, model, method="exact", data=data, **kw),
        "trace": gl.hessian_trace(loss_fn, model, samples=8, data=data, generator=seeds, **kw),
        "diagonal": torch.cat(
            [
                d.flatten()
                for d in gl.hessian_diagonal(
                    loss_fn, model, method="exact", data=data, **kw
                ).values()
            ]
        ),
        "eigenvalues": gl.hessian_eigenvalues(
            loss_fn, model, k=2, tol=1e-12, data=data, generator=seeds, **kw
        ).values,
        "spectrum": gl.hessian_spectrum(
            loss_fn, model, probes=2, steps=5, data=data, generator=seeds, **kw
        ).nodes,
        # the GGN: products (its dense matrix) and its exact diagonal, all-reduced the same way
        "ggn": gl.ggn_operator(model, nn.CrossEntropyLoss(), data=data, **kw)
        @ torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64),
        "ggn-diagonal": torch.cat(
            [
                d.flatten()
                for d in gl.ggn_diagonal(model, nn.CrossEntropyLoss(), data=data, **kw).values()
            ]
        ),
        "kfac": torch.cat(
            [
                torch.cat([a.flatten(), b.flatten()])
                for a, b in gl.kfac_operator(
                    model, nn.CrossEntropyLoss(), data=data, **kw
                ).factors.values()
            ]
        ),
        "ef-trace": gl.curvature.trace(
            gl.fisher_operator(model, nn.CrossEntropyLoss(), data=data, **kw), method="exact"
        ),
    }


def _rank(rank: int, out_dir: str) -> None:
    model, x, y, loss_fn, _, _ = dataset_problem(dense=False)
    shard = [(x[a:b], y[a:b]) for a, b in SHARDS[rank]]
    # different seeds on the ranks: rank 0's seed must be used everywhere
    res = _compute(loss_fn, model, shard, 3 + 100 * rank, distributed=True)
    params = list(model.parameters())
    if rank == 1:
        params = params[:-1]
    try:
        gl.hessian_trace(loss_fn, params, data=shard, distributed=True)
        res["mismatch"] = "no error"
    except ValueError as e:
        res["mismatch"] = str(e)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_equal_one_process_on_the_union():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    model, x, y, loss_fn, H, _ = dataset_problem()
    with tempfile.TemporaryDirectory() as tmp:
        run_gloo(_rank, (tmp,), tmp)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    union = [(x[a:b], y[a:b]) for r in (0, 1) for a, b in SHARDS[r]]
    single = _compute(loss_fn, model, union, 3)
    torch.testing.assert_close(single["trace-exact"], H.trace(), rtol=1e-10, atol=1e-10)
    for key, value in single.items():
        for r in range(2):
            torch.testing.assert_close(ranks[r][key], value, rtol=1e-10, atol=1e-10, msg=key)
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same bits on every rank
    for r in range(2):
        assert "distributed=True but the ranks have different parameters" in ranks[r]["mismatch"]


def test_distributed_errors_without_a_group_or_data():
    model, x, y, loss_fn, _, _ = dataset_problem()
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(
        ValueError, match=r"hessian_trace: distributed=True but torch.distributed has"
    ):
        gl.hessian_trace(loss_fn, model, data=[(x, y)], distributed=True)
    with pytest.raises(
        ValueError, match=r"hessian_operator: distributed=True but torch.distributed"
    ):
        gl.hessian_operator(loss_fn, model, data=[(x, y)], distributed=True)
    with pytest.raises(ValueError, match=r"hessian_eigenvalues: distributed=True needs data="):
        gl.hessian_eigenvalues(lambda: loss_fn((x, y)), model, distributed=True)
