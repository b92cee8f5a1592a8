r"""The interface every gradlab curvature operator shares, and the batch loop under it.

:class:`CurvatureOperator` is a symmetric linear operator on flat vectors of length n (the
parameters flattened in order), applied with ``@``, :meth:`~CurvatureOperator.matvec`,
:meth:`~CurvatureOperator.matmat` or, on per-parameter pieces, :meth:`~CurvatureOperator.apply`;
it has ``shape``, ``dtype``, ``device`` and :meth:`~CurvatureOperator.to_scipy`.

A subclass says how to prepare one batch (``_prepare``: build a gradient graph, a linearised
model, ...) and how to apply that batch's matrix to k vectors at once (``_batch_products``).
The base class runs the loop over ``data=`` (a batch's weight is its size, the matrix is
:math:`A = \sum_b w_b A_b / \sum_b w_b`), keeps a single batch's state, sums over ranks with
``distributed=True``, and gives the estimators (:mod:`gradlab.curvature._estimators`) what they
need: a sweep that applies the matrix to many vectors per batch, probes drawn from a seed, and
the exact diagonal.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab.curvature import _distributed as dist_
from gradlab.curvature._probes import rademacher
from gradlab.curvature._progress import Progress

__all__ = ["CurvatureOperator"]

Pieces = list[torch.Tensor]  # one tensor per parameter, each with a leading dimension of k vectors
Accumulate = Callable[[int, Pieces, Pieces, float], None]
BatchWeightFn = Callable[[Any], float] | None
MAX_CHUNK = 64  # vectors per batched product


def _nothing(n: int) -> None:
    pass


class CurvatureOperator:
    """A symmetric curvature matrix (Hessian, GGN, Fisher, KFAC) as a linear operator.

    Vectors are flat, over the parameters in order (``torch.cat([p.flatten() for p in
    params])``), or per-parameter pieces (a list of tensors shaped like the parameters).

    Attributes:
        shape: ``(n, n)`` with ``n`` the number of parameter entries.
        dtype: the dtype of the products.
        device: the device of the products.
        shapes: the shape of each piece (one per parameter).

    Example:
        Every operator (:func:`gradlab.hessian_operator`, :func:`gradlab.ggn_operator`,
        :func:`gradlab.fisher_operator`, :func:`gradlab.kfac_operator`) is one, and every
        estimator of :mod:`gradlab.curvature` takes any of them:

        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> G = gl.ggn_operator(model, nn.MSELoss(), (X, y))
        >>> H = gl.hessian_operator(lambda: nn.functional.mse_loss(model(X), y), model)
        >>> isinstance(G, gl.curvature.CurvatureOperator), G.shape, G.shapes
        (True, (4, 4), [torch.Size([1, 3]), torch.Size([1])])
        >>> E = torch.eye(4)
        >>> torch.allclose(G.matmat(E), H.matmat(E), atol=1e-5)  # a linear model: GGN = Hessian
        True
        >>> top = gl.curvature.eigenvalues(G, k=1).values
        >>> torch.allclose(top, torch.linalg.eigvalsh(G.matmat(E))[-1:], rtol=1e-4)
        True
    """

    def __init__(
        self,
        fn: str,
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        *,
        data: Iterable[Any] | None = None,
        batch_weight: BatchWeightFn = None,
        distributed: bool = False,
        progress: Progress | None = None,
        chunk: int = MAX_CHUNK,
    ) -> None:
        self._fn = fn
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.n = self.offsets[-1]
        self.shape = (self.n, self.n)
        self.dtype = dtype
        self.device = device
        self._chunk = max(1, min(chunk, self.n))
        self._data = data
        self._batch_weight = batch_weight
        self._distributed = distributed
        self._set_progress(progress)
        if data is None:
            self._batches: int | None = 1
        else:
            self._batches = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        self._cache: tuple[Any, float] | None = None  # a single batch's state, kept
        # made for one estimator call (the hessian_* functions' own operator), never seen by the
        # user: its estimator's last sweep may spend the kept state (see _sweep)
        self._disposable = False
        self._total_weight: float | None = None  # sum of all batch weights (all ranks)

    def _set_progress(self, progress: Progress | None) -> None:
        self._count: Callable[[int], None] = progress.advance if progress else _nothing
        self._on_batches: Callable[[int], None] = progress.set_batches if progress else _nothing
        # a closed-form path (an exact diagonal by backpropagation) takes the n products it
        # does not run off the total: progress counts what runs
        self._skip: Callable[[int], None] = progress.skip if progress else _nothing

    def _with_progress(self, progress: Progress | None) -> CurvatureOperator:
        """A shallow copy counting its products on ``progress`` (the caller's is left alone)."""
        op = copy.copy(self)
        op._set_progress(progress)
        return op

    # ----------------------------------------------------------------------------------------
    # what a subclass provides

    def _prepare(self, batch: Any, index: int | None) -> Any:
        """The state of one batch (``index`` None: no ``data=``)."""
        raise NotImplementedError

    def _batch_products(self, state: Any, V: Pieces) -> Pieces:
        """One batch's matrix applied to the k vectors in ``V`` (leading dimension k)."""
        raise NotImplementedError

    def _last_products(self, state: Any, V: Pieces) -> Pieces:
        """As :meth:`_batch_products`, the last use of ``state``: it may free what it holds."""
        return self._batch_products(state, V)

    def _apply_one(self, state: Any, vs: Pieces) -> Pieces:
        """One batch's matrix applied to one vector (no leading dimension)."""
        return [h[0] for h in self._batch_products(state, [v.unsqueeze(0) for v in vs])]

    def _after_pass(self) -> None:
        """Called after each full pass over the batches."""

    # ----------------------------------------------------------------------------------------
    # batches

    def _weight(self, batch: Any, index: int) -> float:
        if self._batch_weight is not None:
            w = float(self._batch_weight(batch))
            if not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"{self._fn}: batch_weight returned {w!r} for batch {index}; return a finite "
                    f"weight >= 0"
                )
            return w
        first = next((t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)), None)
        if first is None:
            raise ValueError(
                f"{self._fn}: data yielded a {type(batch).__name__} as batch {index}, which holds "
                f"no tensor to take the batch size from; yield tensors or tuples/dicts of tensors, "
                f"or pass batch_weight=lambda batch: ..."
            )
        if first.dim() == 0:
            raise ValueError(
                f"{self._fn}: the first tensor of batch {index} is 0-dimensional, so it has no "
                f"batch size; put the batched tensor first or pass batch_weight=lambda batch: ..."
            )
        if first.shape[0] == 0:
            raise ValueError(
                f"{self._fn}: batch {index} of data is empty (its first tensor has shape "
                f"{tuple(first.shape)}); drop empty batches (e.g. DataLoader(drop_last=True))"
            )
        return float(first.shape[0])

    def _iter_data(self) -> Iterator[tuple[Any, int | None, float]]:
        """Each batch as ``(batch, index, weight)``; counts batches and weight on a first pass."""
        if self._data is None:
            yield None, None, 1.0
            if self._total_weight is None:
                self._total_weight = 1.0
            return
        count, weight = 0, 0.0
        for index, batch in enumerate(self._data):
            w = self._weight(batch, index)
            count += 1
            weight += w
            yield batch, index, w
        if self._total_weight is None:
            totals = torch.tensor([weight, float(count)], dtype=torch.float64)
            if self._distributed:
                totals = self._reduced(totals)
            if totals[1] == 0:
                raise ValueError(
                    f"{self._fn}: data yielded no batches; pass a non-empty list or DataLoader"
                )
            if totals[0] <= 0:
                raise ValueError(
                    f"{self._fn}: the batch weights sum to {float(totals[0])!r}; the dataset mean "
                    f"needs a positive total weight"
                )
            self._total_weight = float(totals[0])
            if self._batches is None:
                self._batches = count
                self._on_batches(count)

    def _reduced(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy on the operator's device and back, for nccl)."""
        return dist_.all_reduce_sum(t.to(self.device)).to(t.device)

    def _states(self) -> Iterator[tuple[Any, float]]:
        """Each batch's state and weight, one alive at a time (a single one is kept)."""
        if self._cache is not None:
            yield self._cache
            return
        single = self._batches == 1
        for batch, index, w in self._iter_data():
            state = self._prepare(batch, index)
            if single:
                self._cache = (state, w)
            yield state, w
        self._after_pass()

    # ----------------------------------------------------------------------------------------
    # products, as the estimators use them

    def _sweep(
        self,
        chunks: int,
        vectors: Callable[[int], Pieces],
        accumulate: Accumulate,
        buffers: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]],
        *,
        final: bool = False,
    ) -> None:
        """Apply every batch's matrix to ``vectors(c)`` for each chunk ``c``.

        ``vectors(c)`` must give the same vectors on every call (it is called once per batch).
        ``accumulate(c, V, A_b V, w_b)`` adds its weighted contribution into ``buffers`` (a list,
        or a callable giving it after the pass), which are then summed over ranks and divided by
        the total weight: the result is linear in :math:`A = \\sum_b w_b A_b / \\sum_b w_b`.

        A batch's state that is not kept (``data=`` with several batches) is spent by its last
        chunk (:meth:`_last_products`: a Hessian graph frees its saved tensors as the product
        runs, rather than living on beside the next batch's). ``final=True``: this sweep is the
        caller's last use of the operator, so on a :attr:`_disposable` operator the kept state
        is spent too, and dropped.
        """
        spend = final and self._disposable
        for state, w in self._states():
            last = chunks - 1 if spend or self._cache is None else -1
            for c in range(chunks):
                V = vectors(c)
                if c == last:
                    HV = self._last_products(state, V)
                else:
                    HV = self._batch_products(state, V)
                accumulate(c, V, HV, w)
                self._count(V[0].shape[0])
        if spend:
            self._cache = None
        self._finish(buffers() if callable(buffers) else buffers)

    def _finish(self, buffers: Sequence[torch.Tensor]) -> None:
        """Sum ``buffers`` over ranks and divide them by the total weight, in place."""
        if self._distributed and buffers:
            flat = torch.cat([b.reshape(-1) for b in buffers]) if len(buffers) > 1 else None
            if flat is None:
                dist_.all_reduce_sum(buffers[0])
            else:
                dist_.all_reduce_sum(flat)
                for b, piece in zip(buffers, flat.split([b.numel() for b in buffers])):
                    b.copy_(piece.view_as(b))
        total = self._total_weight
        if total is None:
            raise RuntimeError(f"{self._fn}: internal error: finish() before a pass over the data")
        if total != 1.0:
            for b in buffers:
                b.div_(total)

    def _split(self, rows: torch.Tensor) -> Pieces:
        """``(k, n)`` rows -> per-parameter pieces ``(k, *shape)`` (views)."""
        k = rows.shape[0]
        return [
            rows[:, a:b].reshape(k, *shape)
            for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)
        ]

    def _rows_products(self, rows: torch.Tensor) -> torch.Tensor:
        """:math:`A v_i` for each row ``v_i`` of ``rows`` (shape ``(m, n)``), as rows."""
        m, k = rows.shape[0], self._chunk
        chunks = math.ceil(m / k)
        results: list[torch.Tensor | None] = [None] * chunks

        def vectors(c: int) -> Pieces:
            return self._split(rows[c * k : (c + 1) * k])

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            flat = torch.cat([h.reshape(h.shape[0], -1) for h in HV], dim=1)
            prev = results[c]
            if prev is None:
                results[c] = flat if w == 1.0 else flat.mul_(w)
            else:
                prev.add_(flat, alpha=w)

        def done() -> list[torch.Tensor]:
            return [r for r in results if r is not None]

        self._sweep(chunks, vectors, accumulate, done)
        out = done()
        return out[0] if len(out) == 1 else torch.cat(out)

    def _rows_forms(self, rows: torch.Tensor, *, final: bool = False) -> torch.Tensor:
        """:math:`v_i^\\top A v_i` for each row ``v_i`` of ``rows`` (shape ``(m, n)``).

        ``final``: the caller's last use of the operator (see :meth:`_sweep`).
        """
        m = rows.shape[0]
        out = torch.zeros(m, dtype=self.dtype, device=self.device)
        k = self._chunk

        def vectors(c: int) -> Pieces:
            return self._split(rows[c * k : (c + 1) * k])

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            kk = V[0].shape[0]
            forms = sum((v * h).reshape(kk, -1).sum(1) for v, h in zip(V, HV))
            out[c * k : c * k + kk].add_(forms, alpha=w)  # type: ignore[arg-type]

        self._sweep(math.ceil(m / k), vectors, accumulate, [out], final=final)
        return out

    def _exact_diagonal(self) -> torch.Tensor:
        """The exact diagonal, flat: :math:`A_{jj} = e_j^\\top A e_j` by n products."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        units = [
            (i, o, min(self._chunk, size - o))
            for i, size in enumerate(self.sizes)
            for o in range(0, size, self._chunk)
        ]

        def vectors(c: int) -> Pieces:
            i, o, k = units[c]
            V = [torch.zeros((k, *s), dtype=self.dtype, device=self.device) for s in self.shapes]
            cols = torch.arange(k, device=self.device)
            V[i].view(k, -1)[cols, o + cols] = 1
            return V

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            i, o, k = units[c]
            cols = torch.arange(k, device=self.device)
            entries = HV[i].reshape(k, -1)[cols, o + cols]
            out[self.offsets[i] + o : self.offsets[i] + o + k].add_(entries, alpha=w)

        self._sweep(len(units), vectors, accumulate, [out])
        return out

    # ----------------------------------------------------------------------------------------
    # the public products

    def apply(self, vs: Sequence[torch.Tensor]) -> Pieces:
        """:math:`Av` for one vector given as pieces shaped like the parameters.

        The result's pieces are fresh tensors (never aliasing ``vs`` or each other), so the
        caller may update them in place.

        Raises:
            ValueError: ``vs`` is not one tensor per parameter, each of its parameter's shape.
        """
        vs = list(vs)
        if len(vs) != len(self.shapes) or any(
            not isinstance(v, torch.Tensor) or v.shape != s for v, s in zip(vs, self.shapes)
        ):
            got = [tuple(getattr(v, "shape", ())) for v in vs]
            raise ValueError(
                f"{self._fn}.apply: vs has shapes {got}; pass one tensor per parameter, shaped "
                f"like it: {[tuple(s) for s in self.shapes]}"
            )
        if any(v.is_complex() for v in vs):
            re = self.apply([v.real if v.is_complex() else v for v in vs])
            im = self.apply([v.imag if v.is_complex() else torch.zeros_like(v) for v in vs])
            return [torch.complex(a, b) for a, b in zip(re, im)]
        vs = [v.to(self.dtype) for v in vs]
        if self._cache is not None and not self._distributed:  # one batch, kept: A v directly
            self._count(1)
            return _unaliased(self._apply_one(self._cache[0], vs), vs)
        V = [v.unsqueeze(0) for v in vs]
        out: list[torch.Tensor] = []

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            hs = _unaliased([h[0] for h in HV], vs)
            if not out:
                out.extend(hs if w == 1.0 else torch._foreach_mul(hs, w))
            else:
                torch._foreach_add_(out, hs, alpha=w)

        self._sweep(1, lambda c: V, accumulate, lambda: out)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Av` for a flat vector ``v`` of length n (complex: real and imaginary parts)."""
        if not isinstance(v, torch.Tensor) or v.shape != (self.n,):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{self._fn}.matvec: v has shape {got}; pass a flat tensor of shape ({self.n},)"
            )
        if v.is_complex():
            return torch.complex(self.matvec(v.real), self.matvec(v.imag))
        v = v.to(self.dtype)
        if self._cache is not None and not self._distributed:  # one batch, kept: A v directly
            self._count(1)
            vs = [p[0] for p in self._split(v.reshape(1, -1))]
            return torch.cat([h.reshape(-1) for h in self._apply_one(self._cache[0], vs)])
        return self._rows_products(v.reshape(1, -1))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`AV` for ``V`` of shape ``(n, m)`` (complex: real and imaginary parts)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.n:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(
                f"{self._fn}.matmat: V has shape {got}; pass a tensor of shape ({self.n}, m)"
            )
        if V.is_complex():
            return torch.complex(self.matmat(V.real), self.matmat(V.imag))
        V = V.to(self.dtype)
        m = V.shape[1]
        if self._cache is not None and not self._distributed and 0 < m <= self._chunk:
            # one batch, kept, one chunk: pieces are views of V's rows, results written into
            # place (no transposed copy of V, no concatenation)
            self._count(m)
            bounds = list(zip(self.offsets, self.offsets[1:]))
            pieces = [V[a:b].T.reshape(m, *s) for (a, b), s in zip(bounds, self.shapes)]
            out = torch.empty(self.n, m, dtype=self.dtype, device=self.device)
            for (a, b), h in zip(bounds, self._batch_products(self._cache[0], pieces)):
                out[a:b] = h.reshape(m, -1).T
            return out
        return self._rows_products(V.T.contiguous()).T

    def __matmul__(self, v: Any) -> Any:
        """``A @ v``: a flat vector (n,), a matrix (n, m), or per-parameter pieces (a list)."""
        if isinstance(v, (list, tuple)):
            return self.apply(v)
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{self._fn}: A @ v needs a tensor of shape ({self.n},) or ({self.n}, m), or a "
                f"list of per-parameter pieces, got a {type(v).__name__}"
            )
        return self.matvec(v) if v.dim() == 1 else self.matmat(v)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (symmetric) for ``eigsh``, ``cg``, ``minres``.

        NumPy vectors go to the operator's device and dtype and back; a complex vector is
        applied to its real and imaginary parts. Needs scipy (``pip install scipy``; it is in
        gradlab's ``fast`` extra).
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError:
            raise ImportError(
                f"{self._fn}.to_scipy needs scipy, which is not installed; pip install scipy (or "
                f"pip install 'gradlab[fast]')"
            ) from None
        import numpy as np

        def mv(x: Any) -> Any:
            x = np.asarray(x).reshape(-1)
            if np.iscomplexobj(x):
                return mv(x.real) + 1j * mv(x.imag)
            return self.matvec(torch.as_tensor(x, device=self.device)).cpu().numpy()

        def mm(x: Any) -> Any:
            x = np.asarray(x)
            if np.iscomplexobj(x):
                return mm(x.real) + 1j * mm(x.imag)
            return self.matmat(torch.as_tensor(x, device=self.device)).cpu().numpy()

        dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=dtype)

    # ----------------------------------------------------------------------------------------
    # vectors

    def _random_chunks(
        self, m: int, seed: int, kind: str = "rademacher"
    ) -> tuple[int, Callable[[int], Pieces]]:
        """``m`` random vectors as ``(chunks, vectors)`` for :meth:`_sweep`, drawn from ``seed``.

        The same seed gives the same vectors on every call and every rank: the generator is
        reseeded at chunk 0, and chunks are asked for in order.
        """
        k = self._chunk
        gen = torch.Generator(device=self.device)

        def vectors(c: int) -> Pieces:
            if c == 0:
                gen.manual_seed(seed)
            rows = min(k, m - c * k)
            out = []
            for shape in self.shapes:
                if kind == "rademacher":
                    out.append(rademacher((rows, *shape), gen, self.dtype, self.device))
                else:
                    out.append(
                        torch.randn(
                            (rows, *shape), generator=gen, dtype=self.dtype, device=self.device
                        )
                    )
            return out

        return math.ceil(m / k), vectors

    def _random_rows(self, m: int, seed: int, kind: str = "rademacher") -> torch.Tensor:
        """:math:`m` random vectors as rows ``(m, n)`` (Rademacher or Gaussian) from ``seed``."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if kind == "rademacher":
            return rademacher((m, self.n), gen, self.dtype, self.device)
        return torch.randn(m, self.n, generator=gen, dtype=self.dtype, device=self.device)

    def _unflatten(self, flat: torch.Tensor, structure: Any) -> Any:
        """A flat vector as a tensor, a tuple, or a dict by parameter name (``structure``)."""
        pieces = [p.reshape(s) for p, s in zip(flat.split(self.sizes), self.shapes)]
        if structure == "tensor":
            return pieces[0] if len(pieces) == 1 else flat
        if structure == "sequence":
            return tuple(pieces)
        return dict(zip(structure, pieces))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


def _unaliased(hs: Pieces, vs: Pieces) -> Pieces:
    """``hs`` with any piece that shares storage with ``vs`` or an earlier piece cloned.

    Autograd may hand a gradient straight through (an identity-like backward returns the
    grad_output it was given, an ``add`` gives both inputs one tensor), so a product's pieces can
    alias the vector or each other; in-place updates need them distinct.
    """
    seen = {v.untyped_storage().data_ptr() for v in vs}
    out = []
    for h in hs:
        ptr = h.untyped_storage().data_ptr()
        if ptr in seen:
            h = h.clone()
            ptr = h.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(h)
    return out
