"""data=: curvature of the dataset-mean loss over batches equals the full-batch result."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gradlab as gl
from tests.curvature._helpers import dataset_problem

SIZES = (5, 7, 4)  # uneven batches of the 16 samples


def _list_batches(x, y):
    out, start = [], 0
    for s in SIZES:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def _loaders(x, y):
    return {
        "list": _list_batches(x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=6),  # 6, 6, 4
    }


@pytest.mark.parametrize("kind", ["list", "dataloader"])
def test_exact_curvature_over_batches_equals_the_full_batch(kind):
    model, x, y, loss_fn, H, _ = dataset_problem()
    data = _loaders(x, y)[kind]
    full = lambda: loss_fn((x, y))
    tr = gl.hessian_trace(loss_fn, model, method="exact", data=data)
    torch.testing.assert_close(tr, H.trace(), rtol=1e-10, atol=1e-10)
    diag = gl.hessian_diagonal(loss_fn, model, method="exact", data=data)
    flat = torch.cat([d.flatten() for d in diag.values()])
    torch.testing.assert_close(flat, H.diagonal(), rtol=1e-10, atol=1e-10)
    evals = torch.linalg.eigvalsh(H)
    top = evals[torch.argsort(evals.abs(), descending=True)[:3]]
    res = gl.hessian_eigenvalues(loss_fn, model, k=3, tol=1e-13, data=data, generator=0)
    torch.testing.assert_close(res.values, top, rtol=1e-10, atol=1e-10)
    # the stochastic estimators draw the same probes per batch: equal to full batch, same seed
    for method in ("hutchinson", "hutch++"):
        a = gl.hessian_trace(loss_fn, model, samples=12, method=method, data=data, generator=3)
        b = gl.hessian_trace(full, model, samples=12, method=method, generator=3)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    a = gl.hessian_diagonal(loss_fn, model, samples=12, data=data, generator=3)
    b = gl.hessian_diagonal(full, model, samples=12, generator=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-10)
    sa = gl.hessian_spectrum(loss_fn, model, probes=3, steps=6, data=data, generator=4)
    sb = gl.hessian_spectrum(full, model, probes=3, steps=6, generator=4)
    torch.testing.assert_close(sa.nodes, sb.nodes, rtol=1e-8, atol=1e-10)
    ba = gl.hessian_trace_by_block(loss_fn, model, samples=5, data=data, generator=5)
    bb = gl.hessian_trace_by_block(full, model, samples=5, generator=5)
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_custom_batch_weight_gives_the_weighted_mean_of_batch_hessians():
    model, x, y, loss_fn, _, flat_loss = dataset_problem()
    data = _list_batches(x, y)
    weights = [1.0, 3.0, 0.5]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    Hs = [torch.func.hessian(flat_loss)(theta, xb, yb) for xb, yb in data]
    H = sum(w * h for w, h in zip(weights, Hs)) / sum(weights)
    lookup = {id(b): w for b, w in zip(data, weights)}
    tr = gl.hessian_trace(
        loss_fn, model, method="exact", data=data, batch_weight=lambda b: lookup[id(b)]
    )
    torch.testing.assert_close(tr, H.trace(), rtol=1e-10, atol=1e-10)
    op = gl.hessian_operator(loss_fn, model, data=data, batch_weight=lambda b: lookup[id(b)])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_one_graph_per_batch_and_pass_no_hidden_work():
    model, x, y, loss_fn, H, _ = dataset_problem()
    data = _list_batches(x, y)
    calls = []

    def counted(batch):
        calls.append(len(batch[0]))
        return loss_fn(batch)

    seen = []
    gl.hessian_trace(
        counted, model, samples=10, data=data, progress=lambda d, t: seen.append((d, t))
    )
    assert calls == list(SIZES)  # every probe applied to a batch graph in one pass
    assert seen[-1] == (30, 30)  # batches x products
    calls.clear()
    res = gl.hessian_eigenvalues(counted, model, k=1, max_iter=8, tol=0.0, data=data)
    assert calls == list(SIZES) * 8  # one pass per Lanczos step, no extra forward
    assert res.values.shape == (1,)
    calls.clear()
    op = gl.hessian_operator(counted, model, data=data[:1])
    op.matvec(torch.ones(H.shape[0], dtype=torch.float64))
    op.matvec(torch.ones(H.shape[0], dtype=torch.float64))
    assert calls == [5]  # a single batch: its graph is kept


def test_data_errors():
    model, x, y, loss_fn, _, _ = dataset_problem()
    fn = "hessian_trace"
    with pytest.raises(ValueError, match=rf"{fn}: data yielded no batches; pass a non-empty"):
        gl.hessian_trace(loss_fn, model, data=[])
    with pytest.raises(ValueError, match=rf"{fn}: data yielded a int as batch 0, which holds no"):
        gl.hessian_trace(lambda b: loss_fn((x, y)), model, data=[1, 2])
    with pytest.raises(
        TypeError,
        match=rf"{fn}: data must be a re-iterable \(read once per pass\), "
        r"got an iterator \(generator\)",
    ):
        gl.hessian_trace(loss_fn, model, data=(b for b in [(x, y)]))
    with pytest.raises(
        TypeError, match=rf"{fn}: data must be an iterable of batches, got tensor\("
    ):
        gl.hessian_trace(loss_fn, model, data=x)
    with pytest.raises(ValueError, match=rf"{fn}: batch_weight= is only used with data="):
        gl.hessian_trace(lambda: loss_fn((x, y)), model, batch_weight=len)
    with pytest.raises(ValueError, match=rf"{fn}: batch_weight returned -1.0 for batch 0"):
        gl.hessian_trace(loss_fn, model, data=[(x, y)], batch_weight=lambda b: -1.0)
    with pytest.raises(
        TypeError,
        match=rf"{fn}: batch_weight must be a callable batch_weight\(batch\) -> float or "
        r"None, got 3",
    ):
        gl.hessian_trace(loss_fn, model, data=[(x, y)], batch_weight=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{fn}: the first tensor of batch 0 is 0-dimensional"):
        gl.hessian_trace(lambda b: loss_fn((x, y)), model, data=[(torch.tensor(1.0), x)])
    with pytest.raises(ValueError, match=r"hessian_eigenvalues: the batch weights sum to 0.0"):
        gl.hessian_eigenvalues(loss_fn, model, data=[(x, y)], batch_weight=lambda b: 0.0)


def test_data_without_len_counts_its_batches_on_the_first_pass():
    model, x, y, loss_fn, H, _ = dataset_problem()
    batches = _list_batches(x, y)

    class Stream:  # re-iterable, no __len__ (e.g. an IterableDataset's loader)
        def __iter__(self):
            return iter(batches)

    seen: list[tuple[int, int]] = []
    tr = gl.hessian_trace(
        loss_fn,
        model,
        samples=10,
        data=Stream(),
        generator=0,
        progress=lambda d, t: seen.append((d, t)),
    )
    ref = gl.hessian_trace(loss_fn, model, samples=10, data=batches, generator=0)
    torch.testing.assert_close(tr, ref, rtol=1e-12, atol=1e-12)
    assert seen[-1] == (30, 30)  # 3 batches x 10 products, once the pass has counted them
    res = gl.hessian_eigenvalues(loss_fn, model, k=1, tol=1e-13, data=Stream(), generator=0)
    evals = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(
        res.values, evals[evals.abs().argmax()].reshape(1), rtol=1e-10, atol=0
    )
