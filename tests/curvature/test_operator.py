"""gradlab.curvature._operator: hessian_operator against the dense Hessian; batching; scipy."""

from __future__ import annotations

import sys

import pytest
import torch

import gradlab as gl
from gradlab._derivatives._hvp_engine import GradGraph
from gradlab.curvature import _operator
from tests.curvature._helpers import count_products, dataset_problem


def test_matvec_matmat_match_the_dense_hessian():
    model, x, y, loss_fn, H, _ = dataset_problem()
    op = gl.hessian_operator(lambda: loss_fn((x, y)), model)
    n = H.shape[0]
    assert op.shape == (n, n) and op.dtype == torch.float64
    v = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-12, atol=1e-12)
    V = torch.randn(n, 7, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
def test_batched_and_looped_products_agree(batched, monkeypatch):
    model, x, y, loss_fn, H, _ = dataset_problem()
    if not batched:
        monkeypatch.setattr(_operator, "BATCHED_MAX_N", 0)
    op = gl.hessian_operator(lambda: loss_fn((x, y)), model)
    assert op._batched is batched and (op._chunk > 1) is batched
    V = torch.randn(H.shape[0], 9, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-12, atol=1e-12)


def test_an_op_that_cannot_be_batched_falls_back_to_one_at_a_time(monkeypatch):
    model, x, y, loss_fn, H, _ = dataset_problem()
    real = GradGraph.hvp
    calls = {"batched": 0, "single": 0}

    def hvp(self, vs, *, retain_graph=True, create_graph=False, batched=False):
        if batched:
            calls["batched"] += 1
            raise RuntimeError("no batching rule")
        calls["single"] += 1  # the operator's one-vector products
        return real(self, vs, retain_graph=retain_graph, create_graph=create_graph)

    monkeypatch.setattr(GradGraph, "hvp", hvp)
    op = gl.hessian_operator(lambda: loss_fn((x, y)), model)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-12, atol=1e-12)
    assert op._batched is False and calls == {"batched": 1, "single": 5}
    op.matmat(V)  # decided once: no second batched attempt
    assert calls == {"batched": 1, "single": 10}


def test_to_scipy_eigsh_finds_the_top_eigenvalue():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, x, y, loss_fn, H, _ = dataset_problem()
    A = gl.hessian_operator(lambda: loss_fn((x, y)), model).to_scipy()
    assert A.shape == tuple(H.shape) and A.dtype == "float64"
    vals = scipy_linalg.eigsh(A, k=2, which="LM", return_eigenvectors=False)
    evals = torch.linalg.eigvalsh(H)
    expected = evals[torch.argsort(evals.abs(), descending=True)[:2]]
    torch.testing.assert_close(
        torch.as_tensor(sorted(vals, key=abs, reverse=True)), expected, rtol=1e-10, atol=1e-12
    )
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(A.matvec(v.numpy())), H @ v)
    torch.testing.assert_close(torch.as_tensor(A.rmatvec(v.numpy())), H @ v)


def test_to_scipy_without_scipy_says_how_to_install(monkeypatch):
    w = torch.randn(3, requires_grad=True)
    op = gl.hessian_operator(lambda: (w**4).sum(), w)
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match=r"hessian_operator.to_scipy needs scipy.*pip install"):
        op.to_scipy()


def test_operator_errors():
    w = torch.randn(3, requires_grad=True)
    op = gl.hessian_operator(lambda: (w**4).sum(), w)
    with pytest.raises(ValueError, match=r"hessian_operator.matvec: v has shape \(4,\); pass a"):
        op.matvec(torch.ones(4))
    with pytest.raises(ValueError, match=r"hessian_operator.matmat: V has shape \(3,\); pass a"):
        op.matmat(torch.ones(3))
    with pytest.raises(
        TypeError,
        match=r"hessian_operator: loss_fn must be a callable returning the scalar loss, got int",
    ):
        gl.hessian_operator(3, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hessian_operator: loss_fn must return a scalar"):
        gl.hessian_operator(lambda: w**2, w)
    with pytest.raises(
        TypeError, match=r"hessian_operator: distributed must be True or False, got \'yes\'"
    ):
        gl.hessian_operator(lambda: (w**4).sum(), w, distributed="yes")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"hessian_operator: params must be tensors of one dtype, got"
    ):
        gl.hessian_operator(
            lambda: (w**4).sum(), [w, torch.ones(2, dtype=torch.float64, requires_grad=True)]
        )


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
def test_the_number_of_products_is_the_documented_one(batched, monkeypatch):
    """No hidden work: hessian_trace(samples=30) applies exactly 30 vectors, nothing else."""
    model, x, y, loss_fn, _, _ = dataset_problem()
    if not batched:
        monkeypatch.setattr(_operator, "BATCHED_MAX_N", 0)
    vectors = count_products(monkeypatch)
    seen = []
    gl.hessian_trace(
        lambda: loss_fn((x, y)), model, samples=30, progress=lambda d, t: seen.append(d)
    )
    assert sum(vectors) == 30 and seen[-1] == 30
    assert len(vectors) == (1 if batched else 30)
    vectors.clear()
    gl.hessian_trace(lambda: loss_fn((x, y)), model, samples=30, method="hutch++")
    assert sum(vectors) == 30


def test_products_never_alias_and_eigenvalues_survive_shared_gradients():
    # d/da and d/db of (a + b)^2 / 2 are one tensor, and autograd hands the same product tensor
    # to both parameters; the iterative estimators update products in place
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        return 0.5 * ((a + b) ** 2).sum()

    op = gl.hessian_operator(loss_fn, [a, b])
    v = [torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    hv = op.apply(v)
    ptrs = {t.untyped_storage().data_ptr() for t in (*hv, *v)}
    assert len(ptrs) == 4
    torch.testing.assert_close(hv[0], v[0] + v[1])
    torch.testing.assert_close(hv[1], v[0] + v[1])
    for method in ("lanczos", "power"):
        res = gl.hessian_eigenvalues(loss_fn, [a, b], k=1, method=method, generator=0, tol=1e-10)
        torch.testing.assert_close(res.values, torch.tensor([2.0], dtype=torch.float64))
        x = res.vectors[0]
        torch.testing.assert_close(torch.cat([x[:5] + x[5:]] * 2), 2 * x)  # H x = 2 x


def test_apply_refuses_vectors_not_shaped_like_the_parameters():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    op = gl.hessian_operator(lambda: (a**2).sum() * (b**2).sum(), [a, b])
    good = [torch.ones(5, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)]
    assert [h.shape for h in op.apply(good)] == [a.shape, b.shape]
    for bad in (good[:1], [good[0], torch.ones(6, dtype=torch.float64)]):
        with pytest.raises(ValueError, match=r"apply: vs has shapes .* one tensor per parameter"):
            op.apply(bad)
