"""gradlab.curvature._progress: progress counting of every curvature function."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gradlab as gl
from tests.curvature._helpers import _setup, count_products


def test_progress_true_prints_one_updating_line_to_stderr(capsys, device):
    model, loss_fn, _ = _setup(device)
    quiet = gl.hessian_trace(loss_fn, model, samples=200, generator=0)
    assert capsys.readouterr().err == ""  # silent by default
    loud = gl.hessian_trace(loss_fn, model, samples=200, generator=0, progress=True)
    torch.testing.assert_close(loud, quiet, rtol=0, atol=0)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("\rhessian_trace: 0/200 Hessian-vector products, ")
    assert err.endswith("\n") and err.count("\n") == 1  # one line, rewritten with \r
    final = err.split("\r")[-1]
    assert final.startswith("hessian_trace: 200/200 Hessian-vector products, ")
    assert final.rstrip().endswith(" s") and "ETA" not in final


def test_progress_is_throttled(capsys, monkeypatch):
    from gradlab.curvature import _progress as curvature

    clock = [0.0]
    monkeypatch.setattr(curvature.time, "perf_counter", lambda: clock[0])
    prog = curvature.Progress("f", True)
    with prog.run(1000):
        for _ in range(1000):
            clock[0] += 0.001  # 1000 products in one simulated second
            prog.advance(1)
    err = capsys.readouterr().err
    # the first line, about ten updates in the second, and the final line
    assert 10 <= err.count("\r") <= 13, err.count("\r")
    assert err.split("\r")[-1].startswith("f: 1000/1000 Hessian-vector products, 1.0 s")


def _run_each(name, loss_fn, model, progress):
    calls = {
        "trace": lambda: gl.hessian_trace(loss_fn, model, samples=50, progress=progress),
        "trace-exact": lambda: gl.hessian_trace(loss_fn, model, method="exact", progress=progress),
        "hutch++": lambda: gl.hessian_trace(
            loss_fn, model, samples=30, method="hutch++", progress=progress
        ),
        "diagonal": lambda: gl.hessian_diagonal(loss_fn, model, samples=40, progress=progress),
        "lanczos": lambda: gl.hessian_eigenvalues(loss_fn, model, k=2, progress=progress),
        "power": lambda: gl.hessian_eigenvalues(
            loss_fn, model, k=2, method="power", max_iter=30, progress=progress
        ),
        "spectrum": lambda: gl.hessian_spectrum(
            loss_fn, model, probes=3, steps=10, progress=progress
        ),
        "by-block": lambda: gl.hessian_trace_by_block(
            loss_fn, dict(model.named_children()), samples=20, progress=progress
        ),
    }
    return calls[name]()


_TOTALS = {
    "trace": 50,
    "trace-exact": 56,
    "hutch++": 30,
    "diagonal": 40,
    "lanczos": None,  # stops early: ends at (done, done) with done <= min(100, n)
    "power": None,
    "spectrum": 30,
    "by-block": 60,  # 3 blocks with parameters (the Tanh is empty) x 20 probes
}


@pytest.mark.parametrize("name", list(_TOTALS))
def test_progress_callable_gets_increasing_counts_ending_at_total(name, capsys, device):
    model, loss_fn, _ = _setup(device)
    seen: list[tuple[int, int]] = []
    _run_each(name, loss_fn, model, lambda done, total: seen.append((done, total)))
    assert capsys.readouterr().err == ""  # a callable replaces the status line
    assert seen, "the callable was never called"
    assert seen[-1][0] == seen[-1][1]
    expected = _TOTALS[name]
    if expected is not None:
        dones = [d for d, _ in seen]
        assert all(a < b for a, b in itertools.pairwise(dones)), dones
        assert seen[-1] == (expected, expected)
        assert all(t == expected for _, t in seen)
    else:  # early stop: counts up to the budget, then one last call (done, done)
        budget = 56 if name == "lanczos" else 2 * 30
        dones = [d for d, _ in seen[:-1]]
        assert all(a < b for a, b in itertools.pairwise(dones)), dones
        assert all(t == budget for _, t in seen[:-1])
        assert seen[-1] == (dones[-1], dones[-1]) and dones[-1] < budget


@pytest.mark.parametrize("bad", [1, "yes", None], ids=["int", "str", "none"])
def test_progress_bad_type(bad):
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(
        TypeError,
        match=r"hessian_spectrum: progress must be True, False or a callable "
        r"progress\(done, total\), got",
    ):
        gl.hessian_spectrum(lambda: (w**4).sum(), w, progress=bad)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"hessian_trace_by_block: progress must be True, False or a callable"
    ):
        gl.hessian_trace_by_block(lambda: (w**4).sum(), {"w": w}, progress=bad)  # type: ignore[arg-type]


def test_progress_line_is_ended_when_the_run_fails(capsys):
    from gradlab.curvature import _progress as curvature

    prog = curvature.Progress("f", True)
    with pytest.raises(RuntimeError, match="boom"), prog.run(10):
        prog.advance(3)
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1  # the shell prompt starts on a new line


def _backprop_problem():
    # on the Hessian-backprop fast path (no BatchNorm): the exact diagonal runs no products
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    batches = [
        (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(3)
    ]

    def loss_fn(batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    return model, batches, loss_fn, sum(p.numel() for p in model.parameters())


def test_exact_diagonal_by_backprop_counts_only_products_that_run(monkeypatch):
    count_products(monkeypatch, refuse=True)
    model, batches, loss_fn, n = _backprop_problem()
    seen: list[tuple[int, int]] = []
    gl.hessian_diagonal(
        loss_fn, model, method="exact", data=batches, progress=lambda *a: seen.append(a)
    )
    assert seen == [(0, 2 * n), (0, n), (0, 0)]  # each batch takes its n products off the total
    seen.clear()
    gl.hessian_trace(
        lambda: loss_fn(batches[0]), model, method="exact", progress=lambda *a: seen.append(a)
    )
    assert seen == [(0, 0)]

    class Stream:  # no len(): the total is only known after the first pass
        def __iter__(self):
            return iter(batches)

    seen.clear()
    gl.hessian_diagonal(
        loss_fn, model, method="exact", data=Stream(), progress=lambda *a: seen.append(a)
    )
    assert all(d == 0 and t >= 0 for d, t in seen) and seen[-1] == (0, 0)


def test_exact_diagonal_by_backprop_status_line(capsys):
    model, batches, loss_fn, n = _backprop_problem()
    gl.hessian_diagonal(lambda: loss_fn(batches[0]), model, method="exact", progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    assert final.startswith(f"hessian_diagonal: 0/0 Hessian-vector products ({n} not needed), ")
