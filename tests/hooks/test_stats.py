"""The statistics kernels against a per-tensor float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradlab.hooks import _stats as _stats_module
from gradlab.hooks._stats import ROWS, CpuArena, DistScratch, as_float64, blas_stats, stats_fused


def _grads(device: torch.device) -> list[torch.Tensor]:
    g = [
        torch.randn(3, 4, device=device),
        torch.randn(12, device=device),  # same size as the first: one group on CPU
        torch.randn(5, dtype=torch.float64, device=device),
        torch.tensor([1.0, float("nan"), -2.0], device=device),
        torch.tensor([float("-inf"), 0.5, 1.0], device=device),  # same size: a group with NaN
        torch.empty(0, device=device),
        torch.full((70000,), 3.0, dtype=torch.float16, device=device),
        torch.randn(40, 30, device=device).t(),  # not contiguous
    ]
    return g


def _reference(g: torch.Tensor) -> list[float]:
    if g.numel() == 0:
        return [0.0, 0.0, 0.0]
    d = g.double()
    return [d.square().sum().item(), d.abs().sum().item(), d.abs().max().item()]


def _check(columns: list[list[float]], grads: list[torch.Tensor]) -> None:
    for i, g in enumerate(grads):
        ref = _reference(g)
        got = [columns[k][i] for k in range(ROWS)]
        if g.isnan().any():
            assert all(math.isnan(v) for v in got), i  # every statistic propagates NaN
            continue
        if g.isinf().any():
            assert got[0] == got[1] == got[2] == math.inf, i
            continue
        assert got == pytest.approx(ref, rel=1e-5), i


def _arena_columns(arena: CpuArena, grads: list[torch.Tensor]) -> list[list[float]]:
    for i, g in enumerate(grads):
        arena.add(g, i)
    assert arena.bytes == sum(g.numel() * g.element_size() for g in grads)
    chunks, order = arena.flush()
    assert arena.bytes == 0 and all(c.shape[0] == ROWS for c in chunks)
    assert sorted(order) == list(range(len(grads)))
    stats = torch.cat([c.double() for c in chunks], dim=1).tolist()
    columns = [[0.0] * len(grads) for _ in range(ROWS)]
    for col, i in enumerate(order):
        for k in range(ROWS):
            columns[k][i] = stats[k][col]
    return columns


def test_cpu_grouped_statistics() -> None:
    grads = [g for g in _grads(torch.device("cpu")) if g.numel()]  # empty: handled by the caller
    arena = CpuArena()
    _check(_arena_columns(arena, grads), grads)
    # The rows are reused: a second round (with more gradients of one size than the initial
    # capacity, so that the rows buffer grows) gives fresh results, not accumulated ones.
    more = grads + [torch.randn(3, 4) for _ in range(9)]
    _check(_arena_columns(arena, more), more)
    assert arena.flush() == ([], [])  # nothing left over


def test_cpu_arena_copies_large_gradients_at_once() -> None:
    # A gradient of >= 4096 entries is copied (as |g|) in the hook: the engine may reuse its
    # memory right after. The gradient itself is never modified.
    g = torch.randn(8192)
    before = g.clone()
    arena = CpuArena()
    arena.add(g, 0)
    assert torch.equal(g, before)
    g.fill_(100.0)  # the engine reuses the gradient's memory after the hook
    chunks, _ = arena.flush()
    ref = _reference(before)
    assert chunks[0].flatten().tolist() == pytest.approx(ref, rel=1e-5)


def test_cpu_complex_gradient() -> None:
    g = torch.tensor([3 + 4j, 0j, -1j], dtype=torch.complex64)
    arena = CpuArena()
    arena.add(g, 0)
    chunks, _ = arena.flush()
    assert chunks[0].flatten().tolist() == pytest.approx([26.0, 6.0, 5.0])
    assert [v.item() for v in arena.one(g)] == pytest.approx([26.0, 6.0, 5.0])


def test_cpu_single_gradient_statistics() -> None:
    grads = [g for g in _grads(torch.device("cpu")) if g.numel()]
    stats = CpuArena()
    columns = [[0.0] * len(grads) for _ in range(ROWS)]
    for i, g in enumerate(grads):
        for k, v in enumerate(stats.one(g)):
            assert v.dim() == 0
            columns[k][i] = v.double().item()
    _check(columns, grads)
    assert columns[1][len(grads) - 2] == 210000.0  # float16: L1 accumulated in float32


def test_fused_statistics(device: torch.device) -> None:
    grads = _grads(device)
    columns = [[t.double().item() for t in c] for c in stats_fused(grads)]
    assert len(columns) == ROWS
    _check(columns, grads)


needs_scipy = pytest.mark.skipif(
    not _stats_module._BLAS, reason="SciPy is not installed (the `fast` extra)"
)


@needs_scipy
def test_blas_statistics() -> None:
    torch.manual_seed(0)
    grads = [g for g in _grads(torch.device("cpu")) if g.numel()]
    grads += [torch.randn(70000), torch.arange(-5.0, 6.0, dtype=torch.float64)]  # max: 1st, last
    grads[-2][-1] = 100.0  # the largest entry at the very end
    grads.append(torch.tensor([float("nan"), float("inf"), 1.0]))  # NaN with Inf: NaN
    done = {i: blas_stats(g) for i, g in enumerate(grads)}
    for i, g in enumerate(grads):
        plain = g.dtype in (torch.float32, torch.float64) and g.is_contiguous()
        assert (done[i] is not None) == plain, i  # float16 and non-contiguous: not BLAS
    used = [i for i in done if done[i] is not None]
    columns = [[done[i][k] for i in used] for k in range(ROWS)]  # type: ignore[index]
    _check(columns, [grads[i] for i in used])


@needs_scipy
def test_blas_statistics_decline() -> None:
    assert blas_stats(torch.empty(0)) is None
    assert blas_stats(torch.randn(3, dtype=torch.complex64)) is None
    assert blas_stats(torch.randn(3)._neg_view()) is None
    assert blas_stats(torch.randn(4, 4)[:, 1]) is None  # strided
    g = torch.randn(3, requires_grad=True) * 2  # a gradient that requires grad (create_graph)
    assert blas_stats(g) == pytest.approx(_reference(g.detach()), rel=1e-6)


def _dist_sq(scratch: DistScratch, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """``||x - y||^2`` alone through :meth:`DistScratch.moved` (no snapshot)."""
    found = scratch.moved(x, None, y, False, False)
    return None if found is None else found[1]


@needs_scipy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dist_scratch_is_the_squared_distance(dtype: torch.dtype) -> None:
    # ||x - y||^2 against the float64 sum written out; one scratch serves tensors of several
    # sizes (a larger one grows it, a smaller one after it uses its start)
    torch.manual_seed(0)
    scratch = DistScratch()
    for shape in [(7,), (300, 20), (3, 4), (1,)]:
        x = torch.randn(shape, dtype=dtype)
        y = x + 1e-3 * torch.randn(shape, dtype=dtype)
        want = (x.double() - y.double()).square().sum().item()
        got = _dist_sq(scratch, x, y)
        assert got == pytest.approx(want, rel=1e-12 if dtype == torch.float64 else 1e-5)
    assert _dist_sq(scratch, torch.zeros(3), torch.zeros(3)) == 0.0


@needs_scipy
def test_dist_scratch_declines() -> None:
    scratch = DistScratch()
    x = torch.randn(4, 4)
    assert _dist_sq(scratch, x, x.double()) is None  # mixed dtypes
    assert _dist_sq(scratch, x, torch.randn(5)) is None  # sizes differ
    assert _dist_sq(scratch, x[:, 1], torch.randn(4)) is None  # strided
    assert _dist_sq(scratch, x.half(), x.half()) is None  # no BLAS for float16
    assert _dist_sq(scratch, torch.empty(0), torch.empty(0)) is None


@needs_scipy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("measure, copy", [(True, False), (True, True), (False, True)])
def test_dist_scratch_moved(dtype: torch.dtype, measure: bool, copy: bool) -> None:
    # (||p - snap||^2, ||p - origin||^2) against the float64 sums written out, measured before
    # the copy; the snapshot then holds p exactly (or is untouched); p and origin never change
    torch.manual_seed(0)
    scratch = DistScratch()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for shape in [(7,), (300, 20), (3, 4)]:
        p = torch.randn(shape, dtype=dtype)
        snap = p + 1e-3 * torch.randn(shape, dtype=dtype)
        origin = p + torch.randn(shape, dtype=dtype)
        p0, snap0, origin0 = p.clone(), snap.clone(), origin.clone()
        got = scratch.moved(p, snap, origin, measure, copy)
        assert got is not None
        update, dist = got
        if measure:
            want = (p0.double() - snap0.double()).square().sum().item()
            assert update == pytest.approx(want, rel=tol)
        else:
            assert update is None
        assert dist == pytest.approx(
            (p0.double() - origin0.double()).square().sum().item(), rel=tol
        )
        assert torch.equal(snap, p0 if copy else snap0)
        assert torch.equal(p, p0) and torch.equal(origin, origin0)
        assert scratch.moved(p, None, origin, False, False) == (None, dist)
    x = torch.randn(4, 4, dtype=dtype)
    assert scratch.moved(x, x.clone(), x[:, 1], measure, copy) is None  # strided: nothing done
    assert scratch.moved(x.half(), x.half(), None, measure, copy) is None  # no BLAS


def test_as_float64_keeps_floats_exact(device: torch.device) -> None:
    # 0.1 is not a float32: going through torch.as_tensor(0.1) would round it
    floats = as_float64([0.1, 1e-300], device)
    assert floats.dtype == torch.float64 and floats.tolist() == [0.1, 1e-300]
    mixed = as_float64([0.1, torch.tensor(2.5, dtype=torch.float32, device=device)], device)
    assert mixed.dtype == torch.float64 and mixed.device.type == torch.device(device).type
    assert mixed.tolist() == [0.1, 2.5]
