r"""Estimators on any linear operator: trace, diagonal, top eigenvalues, spectral density.

Each takes ``A``: a gradlab operator (:func:`gradlab.hessian_operator`,
:func:`gradlab.ggn_operator`, :func:`gradlab.fisher_operator`, :func:`gradlab.kfac_operator`), a
``scipy.sparse.linalg.LinearOperator``, a curvlinops operator, a dense matrix, or any object with
``@`` and ``shape`` (``dtype`` and ``device`` where it has them). ``method=`` is looked up in a
registry (:data:`TRACE_METHODS`, :data:`DIAGONAL_METHODS`, :data:`EIGENVALUE_METHODS`), each
entry a small module named after its algorithm; adding one is one file and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

import gradlab._validate as v
from gradlab.curvature._adapt import as_operator
from gradlab.curvature._args import (
    GeneratorArg,
    ProgressArg,
    check_choice,
    check_generator,
    check_positive,
)
from gradlab.curvature._base import CurvatureOperator
from gradlab.curvature._distributed import shared_seed
from gradlab.curvature._hutchinson import hutchinson_diagonal, hutchinson_trace
from gradlab.curvature._hutchpp import hutch_plus_plus
from gradlab.curvature._lanczos import top_lanczos
from gradlab.curvature._power import top_power
from gradlab.curvature._progress import Progress
from gradlab.curvature._results import Eigenpairs, Spectrum
from gradlab.curvature._slq import slq_density, slq_nodes

__all__ = [
    "DIAGONAL_METHODS",
    "EIGENVALUE_METHODS",
    "TRACE_METHODS",
    "diagonal",
    "eigenvalues",
    "spectrum",
    "trace",
]


class Method(NamedTuple):
    """A registered estimator: ``run(op, samples, seed)``, its product count, its minimum."""

    run: Callable[[CurvatureOperator, int, int], torch.Tensor]
    products: Callable[[int, int], int]  # (samples, n) -> products, for progress
    min_samples: int = 1
    random: bool = True


#: The methods of :func:`trace` (``method=``): Hutchinson, Hutch++ (Meyer et al. 2021) and
#: the exact trace by n products.
TRACE_METHODS: dict[str, Method] = {
    "hutchinson": Method(hutchinson_trace, lambda s, n: s),
    "hutch++": Method(hutch_plus_plus, lambda s, n: s, min_samples=3),
    "exact": Method(lambda op, s, seed: op._exact_diagonal().sum(), lambda s, n: n, random=False),
}
#: The methods of :func:`diagonal` (``method=``): Hutchinson's (Bekas et al. 2007) and exact.
DIAGONAL_METHODS: dict[str, Method] = {
    "hutchinson": Method(hutchinson_diagonal, lambda s, n: s),
    "exact": Method(lambda op, s, seed: op._exact_diagonal(), lambda s, n: n, random=False),
}


class EigenMethod(NamedTuple):
    """A registered eigenvalue method: ``run(fn, op, k, max_iter, tol, seed)`` and its count."""

    run: Callable[[str, CurvatureOperator, int, int, float, int], Eigenpairs]
    products: Callable[[int, int, int], int]  # (k, max_iter, n) -> products at most


#: The methods of :func:`eigenvalues` (``method=``): Lanczos and power iteration with deflation.
EIGENVALUE_METHODS: dict[str, EigenMethod] = {
    "lanczos": EigenMethod(top_lanczos, lambda k, it, n: min(n, max(it, k))),
    "power": EigenMethod(
        lambda fn, op, k, it, tol, seed: top_power(op, k, it, tol, seed), lambda k, it, n: k * it
    ),
}


def _seed(method: Method, gen: torch.Generator | None, op: CurvatureOperator) -> int:
    return shared_seed(gen, op._distributed) if method.random else 0


def check_estimator(fn: str, registry: dict[str, Method], method: Any, samples: Any) -> Method:
    """The registry entry for ``method``, with ``samples`` checked against its minimum."""
    check_choice(fn, "method", method, tuple(registry))
    entry = registry[method]
    check_positive(fn, "samples", samples, entry.min_samples)
    return entry


def run_estimator(
    entry: Method, op: CurvatureOperator, samples: int, gen: torch.Generator | None, prog: Progress
) -> torch.Tensor:
    """Run a trace or diagonal estimator on ``op`` (whose products count on ``prog``)."""
    with prog.run(entry.products(samples, op.n), op._batches):
        return entry.run(op, samples, _seed(entry, gen, op))


def check_spectrum(fn: str, probes: Any, steps: Any, grid_size: Any, sigma: Any) -> None:
    check_positive(fn, "probes", probes)
    check_positive(fn, "steps", steps)
    check_positive(fn, "grid_size", grid_size, 2)
    if sigma is not None:
        v.check_positive(fn, "sigma", sigma, fix="Pass a positive width or None")


def run_spectrum(
    op: CurvatureOperator,
    probes: int,
    steps: int,
    grid_size: int,
    sigma: float | None,
    gen: torch.Generator | None,
    prog: Progress,
) -> Spectrum:
    m = min(steps, op.n)
    seed = shared_seed(gen, op._distributed)
    with prog.run(probes * m, op._batches):
        nodes, weights = slq_nodes(op, op._random_rows(probes, seed), m)
    return slq_density(nodes, weights, probes, grid_size, sigma, op.dtype)


def check_eigen(fn: str, method: Any, k: Any, max_iter: Any, tol: Any) -> EigenMethod:
    check_choice(fn, "method", method, tuple(EIGENVALUE_METHODS))
    check_positive(fn, "k", k)
    check_positive(fn, "max_iter", max_iter)
    v.check_nonnegative(fn, "tol", tol)
    return EIGENVALUE_METHODS[method]


def run_eigen(
    fn: str,
    entry: EigenMethod,
    op: CurvatureOperator,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator | None,
    prog: Progress,
) -> Eigenpairs:
    if k > op.n:
        raise ValueError(f"{fn}: k={k} but the operator is only {op.n}x{op.n}; pass k <= {op.n}")
    seed = shared_seed(gen, op._distributed)
    with prog.run(entry.products(k, max_iter, op.n), op._batches):
        return entry.run(fn, op, k, max_iter, tol, seed)


def _operator(fn: str, A: Any, progress: ProgressArg) -> tuple[CurvatureOperator, Progress]:
    prog = Progress(fn, progress)
    return as_operator(fn, A)._with_progress(prog), prog


def trace(
    A: Any,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    progress: ProgressArg = False,
) -> torch.Tensor:
    r"""Trace of a symmetric linear operator ``A``.

    ``"hutchinson"``: :math:`\operatorname{tr} A \approx \frac1m \sum_i z_i^\top A z_i` with
    Rademacher probes (unbiased; ``samples`` products). ``"hutch++"``: Hutch++ with ``samples``
    products in all (far lower variance when a few eigenvalues dominate). ``"exact"``: the sum
    of the exact diagonal (n products, or Hessian backpropagation for a Hessian operator).

    Args:
        A: a gradlab operator, a ``scipy.sparse.linalg.LinearOperator``, a curvlinops operator,
            or any object with ``@`` and a square ``shape``.
        samples: number of products (``"hutch++"``: at least 3).
        method: a key of :data:`TRACE_METHODS`: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``.

    Returns:
        A 0-dim tensor in ``A``'s dtype.

    Raises:
        TypeError: ``A`` is not an operator (no ``shape`` or ``@``), or is complex.
        ValueError: ``A`` is not square, ``A @ v`` disagrees with ``A.shape``, bad ``method``
            or ``samples``.

    Example:
        >>> import gradlab as gl
        >>> from gradlab import curvature
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> curvature.trace(A, method="exact")
        tensor(6., dtype=torch.float64)
    """
    entry = check_estimator("trace", TRACE_METHODS, method, samples)
    gen = check_generator("trace", generator)
    op, prog = _operator("trace", A, progress)
    return run_estimator(entry, op, samples, gen, prog)


def diagonal(
    A: Any,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    progress: ProgressArg = False,
) -> torch.Tensor:
    r"""Diagonal of a symmetric linear operator ``A``, as a flat vector of length n.

    ``"hutchinson"``: :math:`\operatorname{diag} A \approx \frac1m \sum_i z_i \odot A z_i`
    (Bekas et al. 2007; unbiased, ``samples`` products). ``"exact"``:
    :math:`A_{jj} = e_j^\top A e_j` by n products (Hessian backpropagation for a Hessian operator
    where it supports the model). For a gradlab operator the flat vector follows its parameters
    in order.

    Args:
        A: as in :func:`trace`.
        samples: number of probes for ``"hutchinson"``.
        method: a key of :data:`DIAGONAL_METHODS`: ``"hutchinson"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``.

    Returns:
        A tensor of shape ``(n,)``.

    Raises:
        TypeError, ValueError: as in :func:`trace`.

    Example:
        >>> import gradlab as gl
        >>> from gradlab import curvature
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> curvature.diagonal(A, method="exact")
        tensor([2., 3.], dtype=torch.float64)
    """
    entry = check_estimator("diagonal", DIAGONAL_METHODS, method, samples)
    gen = check_generator("diagonal", generator)
    op, prog = _operator("diagonal", A, progress)
    return run_estimator(entry, op, samples, gen, prog)


def eigenvalues(
    A: Any,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: GeneratorArg = None,
    progress: ProgressArg = False,
) -> Eigenpairs:
    r"""Top-k eigenvalues of a symmetric operator by magnitude, largest first, with eigenvectors.

    ``"lanczos"``: at most ``max_iter`` products (capped at n), stopping when every top-k Ritz
    pair :math:`(\theta, x)` has :math:`\|Ax - \theta x\| \le` ``tol`` :math:`|\theta|`
    (ARPACK's rule). ``"power"``: power iteration with deflation, ``max_iter`` products per
    eigenpair at most. See :func:`gradlab.hessian_eigenvalues` for the details.

    Args:
        A: as in :func:`trace`.
        k: how many eigenvalues.
        method: a key of :data:`EIGENVALUE_METHODS`: ``"lanczos"`` or ``"power"``.
        max_iter: products at most (per eigenpair for ``"power"``).
        tol: relative tolerance.
        generator: a ``torch.Generator`` or an int seed for the start vectors.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``.

    Returns:
        :class:`~gradlab.curvature.Eigenpairs` ``(values (k,), vectors (k, n))``.

    Raises:
        TypeError, ValueError: as in :func:`trace`; ``k`` larger than n.

    Example:
        >>> import gradlab as gl
        >>> from gradlab import curvature
        >>> A = torch.diag(torch.tensor([1.0, -5.0, 3.0], dtype=torch.float64))
        >>> curvature.eigenvalues(A, k=2, generator=0).values.round()
        tensor([-5.,  3.], dtype=torch.float64)
    """
    entry = check_eigen("eigenvalues", method, k, max_iter, tol)
    gen = check_generator("eigenvalues", generator)
    op, prog = _operator("eigenvalues", A, progress)
    return run_eigen("eigenvalues", entry, op, k, max_iter, tol, gen, prog)


def spectrum(
    A: Any,
    *,
    probes: int = 10,
    steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: GeneratorArg = None,
    progress: ProgressArg = False,
) -> Spectrum:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    ``probes`` random unit vectors, ``steps`` Lanczos steps each (all probes in one sweep per
    step): Gauss quadrature nodes and weights, smoothed by Gaussians of width ``sigma`` onto a
    grid; see :func:`gradlab.hessian_spectrum` for the details.

    Args:
        A: as in :func:`trace`.
        probes: number of random start vectors.
        steps: Lanczos steps per probe (capped at n).
        grid_size: number of grid points.
        sigma: Gaussian smoothing width (default: 1% of the node range, or 1e-3 if that is 0).
        generator: a ``torch.Generator`` or an int seed.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``.

    Returns:
        :class:`~gradlab.curvature.Spectrum` ``(grid, density, nodes, weights)``.

    Raises:
        TypeError, ValueError: as in :func:`trace`.

    Example:
        >>> import gradlab as gl
        >>> from gradlab import curvature
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> s = curvature.spectrum(A, probes=4, generator=0)
        >>> round(torch.trapezoid(s.density, s.grid).item(), 4)
        1.0
    """
    check_spectrum("spectrum", probes, steps, grid_size, sigma)
    gen = check_generator("spectrum", generator)
    op, prog = _operator("spectrum", A, progress)
    return run_spectrum(op, probes, steps, grid_size, sigma, gen, prog)
