"""Any linear operator as a :class:`CurvatureOperator`: scipy, curvlinops, or ``@`` and ``shape``.

gradlab's own operators pass through. A ``scipy.sparse.linalg.LinearOperator`` (and a NumPy
array or SciPy sparse matrix) is applied to NumPy blocks; anything else with ``@`` and ``shape``
(a curvlinops operator, a dense tensor, a user's matrix-free class) to torch blocks of shape
``(n, k)``, or one column at a time where its ``@`` takes only vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradlab.curvature._base import CurvatureOperator, Pieces

__all__ = ["as_operator"]


def _is_numpy_like(A: Any) -> bool:
    if isinstance(A, np.ndarray):
        return True
    try:
        import scipy.sparse as sp
        from scipy.sparse.linalg import LinearOperator
    except ImportError:
        return False
    return isinstance(A, LinearOperator) or sp.issparse(A)


def _torch_dtype(fn: str, A: Any, dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif dtype is None:
        out = torch.get_default_dtype()
    else:
        try:
            out = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
        except (TypeError, ValueError):
            out = torch.float64
    if out.is_complex:
        raise TypeError(
            f"{fn}: A has the complex dtype {dtype}; the estimators need a real symmetric "
            f"operator. Pass its real part or a real operator"
        )
    return out if out.is_floating_point else torch.float64


def as_operator(fn: str, A: Any) -> CurvatureOperator:
    """``A`` as a :class:`CurvatureOperator` (gradlab's own operators unchanged).

    Raises:
        TypeError: ``A`` has no ``shape`` or no ``@`` (a loss closure or a model, say).
        ValueError: ``A`` is not square, or is empty.
    """
    if isinstance(A, CurvatureOperator):
        return A
    return _Wrapped(fn, A)


class _Wrapped(CurvatureOperator):
    """A foreign operator: one piece of shape ``(n,)``, one "batch", products by ``A @ X``."""

    def __init__(self, fn: str, A: Any) -> None:
        shape = getattr(A, "shape", None)
        numpy_like = _is_numpy_like(A)
        if shape is None or not (numpy_like or hasattr(A, "__matmul__")):
            hint = (
                " For the Hessian of a loss use gl.hessian_trace(loss_fn, params) and its "
                "siblings, or build the operator with gl.hessian_operator(loss_fn, params)"
                if callable(A)
                else ""
            )
            raise TypeError(
                f"{fn}: A must be a linear operator (a gradlab operator, a scipy LinearOperator, "
                f"a curvlinops operator, or an object with @ and shape), got "
                f"{type(A).__name__}.{hint}"
            )
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            dims = ()
        if len(dims) != 2 or dims[0] != dims[1]:
            raise ValueError(
                f"{fn}: A must be a square operator (shape (n, n)), got shape {tuple(shape)!r}. "
                f"The trace, diagonal and eigenvalue estimators need a square (symmetric) matrix"
            )
        if dims[0] == 0:
            raise ValueError(f"{fn}: A has shape (0, 0); pass a non-empty operator")
        dtype = _torch_dtype(fn, A, getattr(A, "dtype", None))
        device = getattr(A, "device", None)
        device = device if isinstance(device, torch.device) and not numpy_like else None
        super().__init__(fn, [torch.Size([dims[0]])], dtype, device or torch.device("cpu"))
        self._A = A
        self._numpy = numpy_like
        self._columns = False  # ``@`` takes vectors only: one column at a time

    def _prepare(self, batch: Any, index: int | None) -> None:
        return None

    def _product(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape (n, k) or (n,), as a torch tensor of the same shape."""
        if self._numpy:
            Y: Any = self._A @ X.detach().cpu().numpy()
        else:
            Y = self._A @ X
        if not isinstance(Y, torch.Tensor):
            Y = torch.as_tensor(np.asarray(Y))
        if Y.shape != X.shape:
            Y = Y.reshape(-1) if X.dim() == 1 and Y.numel() == X.numel() else Y
        if Y.shape != X.shape:
            raise ValueError(
                f"{self._fn}: A @ v returned shape {tuple(Y.shape)} for v of shape "
                f"{tuple(X.shape)}, but A.shape is {self.shape}; A's @ and its shape disagree. "
                f"Fix A.shape or its product"
            )
        return Y.to(device=self.device, dtype=self.dtype)

    def _batch_products(self, state: None, V: Pieces) -> Pieces:
        X = V[0].T  # (n, k)
        if not self._columns:
            try:
                return [self._product(X).T]
            except (TypeError, RuntimeError, NotImplementedError):
                self._columns = True  # e.g. a custom @ written for vectors only
        return [torch.stack([self._product(X[:, j].contiguous()) for j in range(X.shape[1])])]
