"""gradlab.curvature._estimators: trace, diagonal, eigenvalues, spectrum on every operator kind.

Each operator kind wraps the same dense symmetric float64 matrix A, so the estimators are checked
against ``A.trace()``, ``A.diagonal()`` and ``eigvalsh(A)`` directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradlab as gl
from gradlab import curvature

N = 12


def _matrix(device, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (B + B.T).to(device)


class _VectorsOnly:
    """A matrix-free operator whose ``@`` takes one vector at a time (and has no dtype)."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A = A
        self.shape = tuple(A.shape)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1:
            raise TypeError("vectors only")
        return self.A @ v.to(self.A.dtype)


def _hessian_op(A: torch.Tensor):
    """The Hessian operator of the quadratic 0.5 w^T A w (Hessian A), from a loss closure."""
    w = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device, requires_grad=True)
    return gl.hessian_operator(lambda: 0.5 * w @ A @ w, w), w


def _kinds(A: torch.Tensor) -> dict:
    from scipy.sparse.linalg import aslinearoperator

    H, _ = _hessian_op(A)
    kinds = {"gradlab": H, "tensor": A, "vectors-only": _VectorsOnly(A)}
    if A.device.type == "cpu":
        kinds["scipy"] = aslinearoperator(A.numpy())
        kinds["numpy"] = A.numpy()
    return kinds


KINDS = ["gradlab", "tensor", "vectors-only", "scipy", "numpy"]


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-12) -> None:
    """float64 to ``tol``; the vectors-only operator has no dtype, so it runs in float32."""
    if got.dtype == torch.float32:
        tol = max(tol, 1e-5)
    torch.testing.assert_close(got.cpu(), expected.cpu().to(got.dtype), rtol=tol, atol=tol)


def _get(kind: str, A: torch.Tensor):
    kinds = _kinds(A)
    if kind not in kinds:
        pytest.skip(f"{kind} operators are CPU only")
    return kinds[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_trace_and_diagonal(kind, device):
    A = _matrix(device)
    op = _get(kind, A)
    _close(curvature.trace(op, method="exact"), A.trace())
    _close(curvature.diagonal(op, method="exact"), A.diagonal())
    if kind == "vectors-only":  # no dtype attribute: torch's default dtype
        assert curvature.trace(op, method="exact").dtype == torch.get_default_dtype()


@pytest.mark.parametrize("kind", KINDS)
def test_hutchinson_within_4_standard_errors(kind, device):
    A = _matrix(device)
    op = _get(kind, A)
    m = 400
    est = curvature.trace(op, samples=m, generator=1)
    # Rademacher: Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2)
    se = math.sqrt(2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum())) / m)
    assert abs(float(est) - float(A.trace())) < 4 * se
    d = curvature.diagonal(op, samples=m, generator=2).cpu()
    off = (A**2).sum(1).cpu() - A.diagonal().cpu() ** 2  # Var of entry j: sum_{k != j} A_jk^2
    assert bool(((d - A.diagonal().cpu()).abs() < 4 * (off / m).sqrt()).all())


@pytest.mark.parametrize("kind", KINDS)
def test_hutch_plus_plus_exact_on_low_rank(kind, device):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(N, 2, generator=g, dtype=torch.float64).to(device)
    A = U @ U.T  # rank 2: the sketch of 4 vectors spans its range
    op = _get(kind, A)
    est = curvature.trace(op, samples=12, method="hutch++", generator=0)
    _close(est, A.trace(), 1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("kind", KINDS)
def test_eigenvalues(kind, method, device):
    A = _matrix(device)
    if method == "power":  # well separated top magnitudes for power iteration
        A = torch.diag(torch.tensor([9.0, -6.0, 3.0] + [0.5] * (N - 3), dtype=torch.float64))
        A = A.to(device)
    op = _get(kind, A)
    pairs = curvature.eigenvalues(op, k=2, method=method, max_iter=300, tol=1e-10, generator=0)
    ev = torch.linalg.eigvalsh(A).cpu()
    expected = ev[ev.abs().argsort(descending=True)[:2]]
    _close(pairs.values, expected, 1e-7)
    # A x = lambda x; float32 (no dtype): a Rayleigh quotient stalls at rounding while the
    # vector is still off by about sqrt(eps) times the gap ratio
    atol = 1e-4 if pairs.vectors.dtype == torch.float64 else 1e-2
    for value, vec in zip(pairs.values, pairs.vectors):
        x = vec.to(device=device, dtype=A.dtype)
        torch.testing.assert_close(A @ x, float(value) * x, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_spectrum_nodes_are_eigenvalues(kind, device):
    A = _matrix(device)
    op = _get(kind, A)
    s = curvature.spectrum(op, probes=3, steps=N, generator=0, grid_size=200)
    ev = torch.linalg.eigvalsh(A).cpu()
    used = s.nodes[s.weights > 1e-8]  # Lanczos to n steps: Ritz values are eigenvalues
    gaps = (used.cpu()[:, None] - ev[None, :]).abs().min(1).values
    assert float(gaps.max()) < (1e-4 if s.nodes.dtype == torch.float32 else 1e-6)
    _close(s.weights.sum(-1), torch.ones(3), 1e-9)
    assert abs(float(torch.trapezoid(s.density, s.grid)) - 1.0) < 1e-5


def test_estimators_on_curvlinops_operator():
    curvlinops = pytest.importorskip("curvlinops")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    params = list(model.parameters())
    C = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)])
    dense = C @ torch.eye(C.shape[0], dtype=torch.float64)
    G = gl.ggn_operator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(G @ torch.eye(G.shape[0], dtype=torch.float64), dense)
    torch.testing.assert_close(curvature.trace(C, method="exact"), dense.trace())
    torch.testing.assert_close(curvature.diagonal(C, method="exact"), dense.diagonal())
    ev = torch.linalg.eigvalsh(dense)
    top = curvature.eigenvalues(C, k=2, max_iter=100, tol=1e-10, generator=0).values
    torch.testing.assert_close(top, ev.flip(0)[:2], rtol=1e-7, atol=1e-9)
    s = curvature.spectrum(C, probes=2, steps=5, generator=0, grid_size=50)
    assert s.nodes.shape == (2, 5)


def test_hessian_wrappers_equal_estimators_on_the_operator():
    A = _matrix("cpu")
    H, w = _hessian_op(A)
    loss_fn = lambda: 0.5 * w @ A @ w
    for method in ("hutchinson", "hutch++"):
        torch.testing.assert_close(
            gl.hessian_trace(loss_fn, w, samples=30, method=method, generator=4),
            curvature.trace(H, samples=30, method=method, generator=4),
        )
    torch.testing.assert_close(
        gl.hessian_diagonal(loss_fn, w, samples=30, generator=4),
        curvature.diagonal(H, samples=30, generator=4),
    )
    torch.testing.assert_close(
        gl.hessian_eigenvalues(loss_fn, w, k=2, generator=4).values,
        curvature.eigenvalues(H, k=2, generator=4).values,
    )


def test_registries_drive_dispatch():
    assert set(curvature.TRACE_METHODS) == {"hutchinson", "hutch++", "exact"}
    assert set(curvature.DIAGONAL_METHODS) == {"hutchinson", "exact"}
    assert set(curvature.EIGENVALUE_METHODS) == {"lanczos", "power"}
    A = _matrix("cpu")
    for name in curvature.TRACE_METHODS:
        est = curvature.trace(A, samples=2000, method=name, generator=0)
        assert abs(float(est) - float(A.trace())) < 0.5 * float((A**2).sum().sqrt())


def test_estimators_leave_the_operator_alone():
    A = _matrix("cpu")
    H, _ = _hessian_op(A)
    calls = []
    curvature.trace(H, samples=5, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (5, 5)
    assert H._count.__name__ == "_nothing"  # the caller's operator counts nothing afterwards


class _WrongLength:
    shape = (4, 4)

    def __matmul__(self, v):
        return torch.ones(3, *v.shape[1:], dtype=torch.float64)


@pytest.mark.parametrize(
    ("A", "error", "match"),
    [
        (torch.ones(3, 4), ValueError, r"trace: A must be a square operator .*got shape \(3, 4\)"),
        (np.ones((2, 2, 2)), ValueError, r"trace: A must be a square operator"),
        (torch.ones(0, 0), ValueError, r"trace: A has shape \(0, 0\)"),
        (lambda: 1.0, TypeError, r"trace: A must be a linear operator .*gl.hessian_trace"),
        ("abc", TypeError, r"trace: A must be a linear operator .*got str"),
        (_WrongLength(), ValueError, r"trace: A @ v returned shape \(3, .*A.shape is \(4, 4\)"),
        (torch.eye(3, dtype=torch.complex128), TypeError, r"trace: A has the complex dtype"),
    ],
    ids=["not-square", "3d", "empty", "closure", "str", "wrong-product", "complex"],
)
def test_bad_operators(A, error, match):
    with pytest.raises(error, match=match):
        curvature.trace(A, method="exact")


def test_bad_estimator_arguments():
    A = _matrix("cpu")
    with pytest.raises(
        ValueError,
        match=r"trace: method must be one of 'hutchinson', 'hutch\+\+', 'exact', got 'x'",
    ):
        curvature.trace(A, method="x")
    with pytest.raises(ValueError, match=r"trace: samples must be an int >= 3, got 2"):
        curvature.trace(A, method="hutch++", samples=2)
    with pytest.raises(ValueError, match=r"eigenvalues: k=13 but the operator is only 12x12"):
        curvature.eigenvalues(A, k=13)
    with pytest.raises(
        ValueError,
        match=r"spectrum: sigma must be a finite number > 0, got -1.0. Pass a positive width",
    ):
        curvature.spectrum(A, sigma=-1.0)


@pytest.mark.parametrize("shape", [(3, 50), (4, 40_000)], ids=["randint", "bytes"])
def test_rademacher_probes_are_independent_uniform_signs(shape, device):
    from gradlab.curvature._base import rademacher

    g = torch.Generator(device=device).manual_seed(0)
    z = rademacher(shape, g, torch.float64, torch.device(device)).reshape(-1)
    assert z.shape == (math.prod(shape),) and bool((z.abs() == 1).all())
    bound = 4 / math.sqrt(z.numel())  # 4 standard errors of a mean of independent signs
    assert abs(float(z.mean())) < bound
    for lag in range(1, 10):  # bits of one byte, and across bytes: uncorrelated
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 4 / math.sqrt(z.numel() - lag)
    # the same seed gives the same probes
    g2 = torch.Generator(device=device).manual_seed(0)
    assert torch.equal(rademacher(shape, g2, torch.float64, torch.device(device)).reshape(-1), z)


def test_hutchinson_is_exact_on_a_large_diagonal():
    d = torch.linspace(-1.0, 3.0, 70_000, dtype=torch.float64)  # z^T D z = tr D for signs z

    class Diag:
        shape, dtype = (70_000, 70_000), torch.float64

        def __matmul__(self, v):
            return d[:, None] * v if v.dim() == 2 else d * v

    torch.testing.assert_close(curvature.trace(Diag(), samples=3, generator=0), d.sum())
