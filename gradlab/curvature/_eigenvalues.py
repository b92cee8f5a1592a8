r"""Top eigenvalues of the Hessian by magnitude: Lanczos (default) or power iteration."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from gradlab._errors import GraphError
from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
    check_choice,
    check_generator,
    check_positive,
)
from gradlab.curvature._distributed import shared_seed
from gradlab.curvature._operator import HessianOperator, build
from gradlab.curvature._progress import Progress

__all__ = ["Eigenpairs", "hessian_eigenvalues"]


class Eigenpairs(NamedTuple):
    """Top-k eigenpairs by magnitude, largest first.

    ``values``: shape ``(k,)``. ``vectors``: shape ``(k, n)``, row ``i`` the unit eigenvector of
    ``values[i]`` flattened over ``params`` in order (``torch.cat([p.flatten() ...])``).
    """

    values: torch.Tensor
    vectors: torch.Tensor

    def __repr__(self) -> str:
        """The values (k numbers) and the vectors' shape, never the whole vectors."""
        vals = ", ".join(f"{float(v):.6g}" for v in self.values.flatten()[:8])
        more = ", ..." if self.values.numel() > 8 else ""
        return f"Eigenpairs(values=[{vals}{more}], vectors: {tuple(self.vectors.shape)})"


def tridiagonal(
    alpha: Sequence[float] | torch.Tensor, beta: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    b = torch.as_tensor(beta, dtype=torch.float64)[: len(a) - 1]
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def _ritz(alpha: list[float], beta: list[float], b: float) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values of the tridiagonal matrix and their residual norms :math:`b |s_{jk}|`.

    Solved in NumPy: the tridiagonal eigenproblem is tiny next to a product.
    """
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    theta, S = np.linalg.eigh(T)
    return theta, b * np.abs(S[-1])


def _converged(theta: np.ndarray, resid: np.ndarray, k: int, tol: float) -> bool:
    """Whether the top-k Ritz values all have an error estimate below ``tol`` times their size.

    The estimate of Ritz value :math:`\\theta` is :math:`\\min(r, r^2/\\delta)` with
    :math:`r` its residual norm and :math:`\\delta` the distance to the nearest other Ritz value
    (Parlett, *The Symmetric Eigenvalue Problem*, 1998, section 11.7).
    """
    top = np.argsort(-np.abs(theta), kind="stable")[:k]
    err = resid[top]
    if len(theta) > 1:  # theta is sorted: the nearest other Ritz value is a neighbour
        d = np.diff(theta)
        inf = np.array([np.inf])
        gap = np.minimum(np.concatenate((d, inf)), np.concatenate((inf, d)))[top]
        err = np.minimum(err, np.divide(err**2, gap, out=err.copy(), where=gap > 0))
    return bool(np.all(err <= tol * np.maximum(np.abs(theta[top]), 1e-30)))


def lanczos(
    op: HessianOperator, v0: torch.Tensor, steps: int, k: int | None = None, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Lanczos with reorthogonalisation as needed; ``(alpha, beta, V)``, ``V`` the m basis rows.

    Each step: one product and the three-term recurrence. Paige's analysis says the new vector
    loses orthogonality to a Ritz vector only in proportion to :math:`\\varepsilon \\|H\\| / r`
    (``r`` that Ritz pair's residual), so while every residual is above
    :math:`\\sqrt{\\varepsilon}\\, \\|T\\|` the basis stays semi-orthogonal, which keeps the Ritz
    values accurate to working precision (Simon 1984), and no Gram-Schmidt is needed; from the
    first step where a residual falls below that (a Ritz pair converging), every step
    orthogonalises against all previous vectors, a second time when the first pass cancelled
    much (DGKS). With ``k``, stops as soon as the top-k Ritz values are converged to ``tol`` (see
    :func:`_converged`; checked every step).
    """
    # the basis as separate rows, not one (steps, n) block: a block that large is a fresh mmap
    # whose pages fault in on every call (measured 18 ms for 9 rows of 400k), rows are reused
    V: list[torch.Tensor] = [v0 / v0.norm()]
    alpha: list[float] = []
    beta: list[float] = []
    eps = torch.finfo(op.dtype).eps
    block: torch.Tensor | None = None  # the basis as one block, once fully reorthogonalising
    for j in range(steps):
        v = V[j]
        w = op.matvec(v)
        a = float(w @ v)
        alpha.append(a)
        w.sub_(v, alpha=a)
        if j:
            w.sub_(V[j - 1], alpha=beta[-1])
        if block is not None:
            basis = block[: j + 1]
            before = float(w.norm())
            w.sub_(basis.T @ (basis @ w))
            b = float(w.norm())
            if b < 0.7071 * before:  # cancellation: orthogonalise once more (DGKS)
                w.sub_(basis.T @ (basis @ w))
                b = float(w.norm())
        else:
            b = float(w.norm())
        if j == steps - 1 or b <= 1e-10 * max(1.0, abs(a)):
            break
        theta, resid = _ritz(alpha, beta, b)
        if k is not None and j + 1 >= k and _converged(theta, resid, k, tol):
            break
        if block is None and float(resid.min()) <= math.sqrt(eps) * float(np.abs(theta).max()):
            # a Ritz pair is converging: orthogonality would now be lost. From here on the basis
            # lives in one block (rows appended in place) for the Gram-Schmidt products
            block = torch.empty(steps, op.n, dtype=op.dtype, device=op.device)
            torch.stack(V, out=block[: j + 1])
            V = list(block[: j + 1])
            basis = block[: j + 1]
            for _ in range(2):
                w.sub_(basis.T @ (basis @ w))
            b = float(w.norm())
        beta.append(b)
        if block is None:
            V.append(w.div_(b))
        else:
            torch.div(w, b, out=block[j + 1])
            V.append(block[j + 1])
    m = len(alpha)
    return (
        torch.tensor(alpha, dtype=torch.float64),
        torch.tensor(beta[: m - 1], dtype=torch.float64),
        V[:m],
    )


def hessian_eigenvalues(
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    progress: ProgressArg = False,
) -> Eigenpairs:
    r"""Top-k eigenvalues of the Hessian by magnitude, largest first, and their eigenvectors.

    ``"lanczos"``: Lanczos with full reorthogonalisation from one random start, at most
    ``max_iter`` Hessian-vector products (capped at n, where it is exact), stopping when the top-k
    Ritz values have an error estimate :math:`\min(r, r^2/\delta) \le` ``tol`` :math:`|\theta|`,
    with :math:`r = \|H x - \theta x\|` the residual and :math:`\delta` the gap to the nearest other
    Ritz value (the a-posteriori bound of Parlett, 1998, section 11.7, with the Ritz gap for the
    true one); the eigenvectors are then accurate to about :math:`r/\delta`.
    ``"power"``: power iteration with deflation (PyHessian's method), one eigenpair after the
    other, each for at most ``max_iter`` products or until the Rayleigh quotient changes by less
    than ``tol`` relatively (slow when eigenvalues are close in magnitude).

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or ``loss_fn(batch)`` with ``data=``.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        k: how many eigenvalues.
        method: ``"lanczos"`` or ``"power"``.
        max_iter: Hessian-vector products at most (per eigenpair for ``"power"``).
        tol: relative tolerance (see above).
        generator: a ``torch.Generator`` or an int seed for the start vectors.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        data: batches; the Hessian is that of the dataset-mean loss (each product is one pass
            over ``data``, see :func:`gradlab.hessian_operator`).
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: sum over the ranks of the ``torch.distributed`` group (each passes its shard).
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts batches x Hessian-vector products (Lanczos steps; total ``min(max_iter, n)``,
            or ``k * max_iter`` for ``"power"``; an early stop ends with ``(done, done)``).

    Returns:
        :class:`Eigenpairs` ``(values, vectors)``: ``values`` of shape ``(k,)`` sorted by
        decreasing magnitude, ``vectors`` of shape ``(k, n)``.

    Raises:
        TypeError, ValueError: bad arguments (see :func:`gradlab.hessian_operator`).
        GraphError: the loss does not depend on ``params`` or on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> gl.hessian_eigenvalues(lambda: (w**4).sum(), w, k=2).values.round()  # 12 w^2
        tensor([48., 12.])
    """
    fn = "hessian_eigenvalues"
    check_choice(fn, "method", method, ("lanczos", "power"))
    check_positive(fn, "k", k)
    check_positive(fn, "max_iter", max_iter)
    gen = check_generator(fn, generator)
    prog = Progress(fn, progress)
    op, _ = build(
        fn,
        loss_fn,
        params,
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        progress=prog,
    )
    if k > op.n:
        raise ValueError(f"{fn}: k={k} but the Hessian is only {op.n}x{op.n}; pass k <= {op.n}")
    total = min(op.n, max(max_iter, k)) if method == "lanczos" else k * max_iter
    seed = shared_seed(gen, op.distributed)
    with prog.run(total, op.batches):
        if method == "lanczos":
            return top_lanczos(fn, op, k, max_iter, tol, seed)
        return top_power(op, k, max_iter, tol, seed)


def top_lanczos(
    fn: str, op: HessianOperator, k: int, max_iter: int, tol: float, seed: int
) -> Eigenpairs:
    steps = min(op.n, max(max_iter, k))
    alpha, beta, V = lanczos(op, op.random_rows(1, seed, "gaussian")[0], steps, k=k, tol=tol)
    theta, S = torch.linalg.eigh(tridiagonal(alpha, beta))
    top = torch.argsort(theta.abs(), descending=True)[:k]
    if len(top) < k:
        raise GraphError(
            f"{fn}: Lanczos found an invariant subspace of dimension {len(top)} < k={k} "
            f"(the start vector missed part of the spectrum); try another generator"
        )
    coef = S[:, top].to(op.dtype).T  # (k, m)
    vectors = torch.zeros(k, op.n, dtype=op.dtype, device=op.device)
    for i, row in enumerate(V):  # V as rows: no (m, n) block (see lanczos)
        vectors.addr_(coef[:, i].to(op.device), row)
    return Eigenpairs(theta[top].to(op.dtype), vectors)


def top_power(op: HessianOperator, k: int, max_iter: int, tol: float, seed: int) -> Eigenpairs:
    values: list[torch.Tensor] = []
    found: list[torch.Tensor] = []
    for i in range(k):
        v = op.random_rows(1, seed + i, "gaussian")[0]
        lam = torch.tensor(0.0, dtype=op.dtype, device=op.device)
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = op.matvec(v)
            for u in found:
                hv = hv - (u @ hv) * u
            new = v @ hv
            v = hv
            converged = (new - lam).abs() <= tol * new.abs()
            lam = new
            if bool(converged):
                break
        for u in found:
            v = v - (u @ v) * u
        v = v / v.norm()
        values.append(lam)
        found.append(v)
    vals = torch.stack(values)
    order = torch.argsort(vals.abs(), descending=True)
    return Eigenpairs(vals[order], torch.stack(found)[order])
