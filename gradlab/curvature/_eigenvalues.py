r"""Top eigenvalues of the Hessian by magnitude: Lanczos (default) or power iteration."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
)
from gradlab.curvature._estimators import check_eigen, run_eigen
from gradlab.curvature._operator import front
from gradlab.curvature._results import Eigenpairs

__all__ = ["Eigenpairs", "hessian_eigenvalues"]


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
    Ritz pairs :math:`(\theta, x)` have a residual :math:`r = \|H x - \theta x\| \le` ``tol``
    :math:`|\theta|` (ARPACK's and ``scipy.sparse.linalg.eigsh``'s rule): each returned value is
    then within ``tol`` relatively of an eigenvalue of :math:`H` whatever the spectrum (and within
    :math:`r^2/\delta` of it, :math:`\delta` the gap to the rest of the spectrum); the
    eigenvectors are accurate to about :math:`r/\delta`. Like every Krylov method it can miss an
    eigenvalue the start vector is (nearly) orthogonal to, or a cluster's members.
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
    entry = check_eigen(fn, method, k, max_iter, tol)
    f = front(fn, loss_fn, params, generator, mode, data, batch_weight, distributed, progress)
    return run_eigen(fn, entry, f.op, k, max_iter, tol, f.generator, f.progress)
