r"""The Hessian of a loss as a linear operator: one batch, a whole dataset, or across ranks.

:class:`HessianOperator` is what every curvature estimator is written against. A product
:math:`Hv` is a double backward through the first-order gradient graph of the loss (the one
engine, :class:`gradlab._derivatives._hvp_engine.GradGraph`, shared with :func:`gradlab.hvp`):

- ``data=None``: the loss is ``loss_fn()``; its gradient graph is built once and kept, so each
  product costs one double backward (what a hand-written PyHessian-style loop pays).
- ``data=batches``: the loss is the dataset mean
  :math:`L = \sum_b w_b L_b / \sum_b w_b` of the batch losses ``loss_fn(batch)``, with
  :math:`w_b` the batch size (the length of the batch's first tensor) or ``batch_weight(batch)``;
  so :math:`Hv = \sum_b w_b H_b v / \sum_b w_b`. One batch graph is alive at a time (memory does
  not grow with the number of batches); every pass over the data rebuilds each batch's graph (one
  forward and backward per batch), except with a single batch, whose graph is kept. Estimators
  that know all their vectors up front (Hutchinson, the exact diagonal) apply all of them to each
  batch graph in one pass.
- ``distributed=True``: each rank passes its own shard as ``data=``; the weighted sums and the
  total weight are all-reduced (``torch.distributed``, gloo or nccl), so every rank gets the
  product of the Hessian of the loss over the union of the shards.

Batched products (``is_grads_batched``, one vmapped backward for many vectors) win on CPU only
while a single product is dominated by Python and dispatch overhead: measured 3-5x faster up to
about 2,000 parameters, 1.2x at 8,000, and 2x *slower* at 32,000 (MLPs at batch 128; the
``curvature`` benchmark suite has the table). So products are batched, in chunks of up to 64
vectors, when the operator has at most :data:`BATCHED_MAX_N` entries and applied one at a time
otherwise: a fixed rule, no timing probe. An op without a batching rule that raises makes the
operator fall back to one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from gradlab._derivatives._hvp_engine import GradGraph
from gradlab._errors import GraphError
from gradlab.curvature import _distributed as dist_
from gradlab.curvature._args import (
    BatchWeight,
    ParamsArg,
    check_batch_weight,
    check_data,
    check_distributed,
    check_mode,
    check_params,
    param_names,
)
from gradlab.curvature._progress import Progress
from gradlab.curvature._state import model_state

__all__ = ["BATCHED_MAX_N", "HessianOperator", "hessian_operator"]

BATCHED_MAX_N = 4096  # batched (vmapped) products up to this many entries, see the module docs
_MAX_CHUNK = 64  # vectors per batched backward

Pieces = list[torch.Tensor]  # one tensor per parameter, each with a leading dimension of k vectors
Accumulate = Callable[[int, Pieces, Pieces, float], None]


class HessianOperator:
    """The Hessian of a loss w.r.t. some parameters, as a symmetric linear operator.

    Made by :func:`hessian_operator` (and internally by every curvature function). Vectors are
    flat, over the parameters in order (``torch.cat([p.flatten() for p in params])``).

    Attributes:
        shape: ``(n, n)`` with ``n`` the number of parameter entries.
        dtype: the parameters' dtype (also that of the products).
        device: the parameters' device.
        params: the parameter tensors.
    """

    def __init__(
        self,
        fn: str,
        loss_fn: Callable[..., torch.Tensor],
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        *,
        modules: Sequence[nn.Module] = (),
        mode: str | None = "eval",
        data: Iterable[Any] | None = None,
        batch_weight: BatchWeight = None,
        distributed: bool = False,
        progress: Progress | None = None,
        eager: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"{fn}: loss_fn is a {type(loss_fn).__name__}, expected a callable")
        self.fn = fn
        self.loss_fn = loss_fn
        self.params = list(params)
        self.names = list(names)
        self.modules = list(modules)
        self.mode = mode
        self.data = data
        self.batch_weight = batch_weight
        self.distributed = distributed
        # progress: products applied, and the number of batches once len(data) is learnt
        self.count: Callable[[int], None] = progress.advance if progress else lambda n: None
        self.on_batches: Callable[[int], None] = (
            progress.set_batches if progress else lambda batches: None
        )
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.n = self.offsets[-1]
        self.shape = (self.n, self.n)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.chunk = 1 if self.n > BATCHED_MAX_N else max(1, min(_MAX_CHUNK, self.n))
        self.batched = self.chunk > 1
        if data is None:
            self.batches: int | None = 1
        else:
            self.batches = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        self._cache: tuple[GradGraph, float] | None = None
        self._total_weight: float | None = None  # sum of all batch weights (all ranks)
        self._checked = False  # unused parameters checked after the first pass
        self._used = torch.zeros(len(self.params), dtype=torch.int64)
        if distributed:
            if data is None:
                raise ValueError(
                    f"{fn}: distributed=True needs data= (each rank's own shard of batches; "
                    f"loss_fn(batch) is called per batch)"
                )
            dist_.check_group(fn)
            dist_.check_same_shapes(fn, self.names, self.params)
        if eager and data is None:  # one graph, built now (errors show at once) and kept
            for _ in self._graphs():
                pass

    # ----------------------------------------------------------------------------------------
    # batches and graphs

    def _weight(self, batch: Any, index: int) -> float:
        if self.batch_weight is not None:
            w = float(self.batch_weight(batch))
            if not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"{self.fn}: batch_weight returned {w!r} for batch {index}; return a finite "
                    f"weight >= 0"
                )
            return w
        first = next((t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)), None)
        if first is None:
            raise ValueError(
                f"{self.fn}: data yielded a {type(batch).__name__} as batch {index}, which holds "
                f"no tensor to take the batch size from; yield tensors or tuples/dicts of tensors, "
                f"or pass batch_weight=lambda batch: ..."
            )
        if first.dim() == 0:
            raise ValueError(
                f"{self.fn}: the first tensor of batch {index} is 0-dimensional, so it has no "
                f"batch size; put the batched tensor first or pass batch_weight=lambda batch: ..."
            )
        return float(first.shape[0])

    def _loss(self, batch: Any, index: int | None) -> torch.Tensor:
        with contextlib.ExitStack() as stack, torch.enable_grad():
            for module in self.modules:
                stack.enter_context(model_state(module, self.mode))
            loss = self.loss_fn() if index is None else self.loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{self.fn}: loss_fn must return a scalar tensor, got {got}; reduce the loss "
                f"(e.g. .mean())"
            )
        if not loss.requires_grad:
            raise GraphError(
                f"{self.fn}: the loss does not depend on params (no grad_fn); check that loss_fn "
                f"uses the parameters you passed, with grad enabled"
            )
        with torch.enable_grad():
            return loss.reshape(())

    def closures(self) -> Iterator[tuple[Callable[[], torch.Tensor], float]]:
        """Each batch as ``(loss closure, weight)``; counts batches and weight on a first pass."""
        if self.data is None:
            yield (lambda: self._loss(None, None)), 1.0
            if self._total_weight is None:
                self._total_weight = 1.0
            return
        count, weight = 0, 0.0
        for index, batch in enumerate(self.data):
            w = self._weight(batch, index)
            count += 1
            weight += w
            yield functools.partial(self._loss, batch, index), w
        if self._total_weight is None:
            totals = torch.tensor([weight, float(count)], dtype=torch.float64)
            if self.distributed:
                totals = self._reduced(totals)
            if totals[1] == 0:
                raise ValueError(
                    f"{self.fn}: data yielded no batches; pass a non-empty list or DataLoader"
                )
            if totals[0] <= 0:
                raise ValueError(
                    f"{self.fn}: the batch weights sum to {float(totals[0])!r}; the dataset mean "
                    f"needs a positive total weight"
                )
            self._total_weight = float(totals[0])
            if self.batches is None:
                self.batches = count
                self.on_batches(count)

    def _reduced(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy on the parameters' device and back, for nccl)."""
        return dist_.all_reduce_sum(t.to(self.device)).to(t.device)

    def graph_of(self, closure: Callable[[], torch.Tensor]) -> GradGraph:
        graph = GradGraph(closure(), self.params)
        for i in range(len(self.params)):
            if i not in graph.unused:
                self._used[i] += 1
        return graph

    def _graphs(self) -> Iterator[tuple[GradGraph, float]]:
        """Each batch's gradient graph and weight, one alive at a time (a single one is kept)."""
        if self._cache is not None:
            yield self._cache
            return
        single = self.batches == 1
        for closure, w in self.closures():
            graph = self.graph_of(closure)
            if single:
                self._cache = (graph, w)
            yield graph, w
        self.check_unused()

    def check_unused(self) -> None:
        if self._checked:
            return
        used = self._reduced(self._used.clone()) if self.distributed else self._used
        missing = [self.names[i] for i in range(len(self.params)) if int(used[i]) == 0]
        if missing:
            raise GraphError(
                f"{self.fn}: the loss does not use {', '.join(missing)}; its Hessian rows are "
                f"undefined there. Pass only the parameters the loss uses (e.g. freeze the others "
                f"with requires_grad_(False))"
            )
        self._checked = True

    # ----------------------------------------------------------------------------------------
    # products

    def _hvp(self, graph: GradGraph, V: Pieces) -> Pieces:
        """H_b applied to the k vectors in ``V`` (pieces with a leading dimension k)."""
        k = V[0].shape[0]
        if k > 1 and self.batched:
            try:
                return graph.hvp(V, batched=True)
            except RuntimeError:  # an op without a batching rule: one at a time from now on
                self.batched = False
        if k == 1:
            return [h.unsqueeze(0) for h in graph.hvp([v[0] for v in V])]
        cols = [graph.hvp([v[j] for v in V]) for j in range(k)]
        return [torch.stack(hs) for hs in zip(*cols)]

    def sweep(
        self,
        chunks: int,
        vectors: Callable[[int], Pieces],
        accumulate: Accumulate,
        buffers: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]],
    ) -> None:
        """Apply the Hessian of every batch to ``vectors(c)`` for each chunk ``c``.

        ``vectors(c)`` must give the same vectors on every call (it is called once per batch).
        ``accumulate(c, V, H_b V, w_b)`` adds its weighted contribution into ``buffers`` (a list,
        or a callable giving it after the pass), which are then summed over ranks and divided by
        the total weight: the result is linear in :math:`H = \\sum_b w_b H_b / \\sum_b w_b`.
        """
        for graph, w in self._graphs():
            for c in range(chunks):
                V = vectors(c)
                accumulate(c, V, self._hvp(graph, V), w)
                self.count(V[0].shape[0])
        self.finish(buffers() if callable(buffers) else buffers)

    def finish(self, buffers: Sequence[torch.Tensor]) -> None:
        """Sum ``buffers`` over ranks and divide them by the total weight, in place."""
        if self.distributed and buffers:
            flat = torch.cat([b.reshape(-1) for b in buffers]) if len(buffers) > 1 else None
            if flat is None:
                dist_.all_reduce_sum(buffers[0])
            else:
                dist_.all_reduce_sum(flat)
                for b, piece in zip(buffers, flat.split([b.numel() for b in buffers])):
                    b.copy_(piece.view_as(b))
        total = self._total_weight
        if total is None:
            raise RuntimeError(f"{self.fn}: internal error: finish() before a pass over the data")
        if total != 1.0:
            for b in buffers:
                b.div_(total)

    def split(self, rows: torch.Tensor) -> Pieces:
        """``(k, n)`` rows -> per-parameter pieces ``(k, *shape)`` (views for a single row)."""
        k = rows.shape[0]
        return [
            rows[:, a:b].reshape(k, *shape)
            for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)
        ]

    def rows_products(self, rows: torch.Tensor) -> torch.Tensor:
        """:math:`H v_i` for each row ``v_i`` of ``rows`` (shape ``(m, n)``), as rows."""
        m, k = rows.shape[0], self.chunk
        chunks = math.ceil(m / k)
        results: list[torch.Tensor | None] = [None] * chunks

        def vectors(c: int) -> Pieces:
            return self.split(rows[c * k : (c + 1) * k])

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            flat = torch.cat([h.reshape(h.shape[0], -1) for h in HV], dim=1)
            prev = results[c]
            if prev is None:
                results[c] = flat if w == 1.0 else flat.mul_(w)
            else:
                prev.add_(flat, alpha=w)

        def done() -> list[torch.Tensor]:
            return [r for r in results if r is not None]

        self.sweep(chunks, vectors, accumulate, done)
        out = done()
        return out[0] if len(out) == 1 else torch.cat(out)

    def rows_forms(self, rows: torch.Tensor) -> torch.Tensor:
        """:math:`v_i^\top H v_i` for each row ``v_i`` of ``rows`` (shape ``(m, n)``)."""
        m = rows.shape[0]
        out = torch.zeros(m, dtype=self.dtype, device=self.device)
        k = self.chunk

        def vectors(c: int) -> Pieces:
            return self.split(rows[c * k : (c + 1) * k])

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            kk = V[0].shape[0]
            forms = sum((v * h).reshape(kk, -1).sum(1) for v, h in zip(V, HV))
            out[c * k : c * k + kk].add_(forms, alpha=w)  # type: ignore[arg-type]

        self.sweep(math.ceil(m / k), vectors, accumulate, [out])
        return out

    def apply(self, vs: Pieces) -> Pieces:
        """:math:`Hv` for one vector given as pieces shaped like the parameters (no leading dim).

        The iterative estimators work on pieces: nothing is flattened or concatenated, and the
        result's pieces are fresh tensors (never aliasing ``vs`` or each other), so the caller
        may update them in place.

        Raises:
            ValueError: ``vs`` is not one tensor per parameter, each of its parameter's shape.

        Example:
            >>> import gradlab as gl
            >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
            >>> b = torch.ones(1, requires_grad=True)
            >>> H = gl.hessian_operator(lambda: (a**3).sum() + (b**2).sum(), [a, b])
            >>> H.apply([torch.ones(2), torch.ones(1)])  # diag(6 a), 2
            [tensor([ 6., 12.]), tensor([2.])]
        """
        if len(vs) != len(self.shapes) or any(v.shape != s for v, s in zip(vs, self.shapes)):
            got = [tuple(getattr(v, "shape", ())) for v in vs]
            raise ValueError(
                f"{self.fn}.apply: vs has shapes {got}; pass one tensor per parameter, shaped "
                f"like it: {[tuple(s) for s in self.shapes]}"
            )
        if self._cache is not None and not self.distributed:  # one graph, kept: H v directly
            graph = self._cache[0]  # its weight is the total weight: H = H_b
            self.count(1)
            return _unaliased(graph.hvp(vs), vs)
        V = [v.unsqueeze(0) for v in vs]
        out: list[torch.Tensor] = []

        def accumulate(c: int, V: Pieces, HV: Pieces, w: float) -> None:
            hs = _unaliased([h[0] for h in HV], vs)
            if not out:
                out.extend(hs if w == 1.0 else torch._foreach_mul(hs, w))
            else:
                torch._foreach_add_(out, hs, alpha=w)

        self.sweep(1, lambda c: V, accumulate, lambda: out)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Hv` for a flat vector ``v`` of length n (one product per batch)."""
        if not isinstance(v, torch.Tensor) or v.shape != (self.n,):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{self.fn}.matvec: v has shape {got}; pass a flat tensor of shape ({self.n},)"
            )
        return self.rows_products(v.to(self.dtype).reshape(1, -1))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`HV` for ``V`` of shape ``(n, m)``."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.n:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(
                f"{self.fn}.matmat: V has shape {got}; pass a tensor of shape ({self.n}, m)"
            )
        return self.rows_products(V.T.to(self.dtype).contiguous()).T

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (symmetric) for ``eigsh``, ``cg``, ``minres``.

        NumPy vectors go to the parameters' device and dtype and back. Needs scipy
        (``pip install scipy``; it is in gradlab's ``fast`` extra).
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError:
            raise ImportError(
                f"{self.fn}.to_scipy needs scipy, which is not installed; pip install scipy (or "
                f"pip install 'gradlab[fast]')"
            ) from None
        import numpy as np

        def mv(x: Any) -> Any:
            t = torch.as_tensor(np.asarray(x).reshape(-1), device=self.device)
            return self.matvec(t).cpu().numpy()

        def mm(x: Any) -> Any:
            t = torch.as_tensor(np.asarray(x), device=self.device)
            return self.matmat(t).cpu().numpy()

        dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=dtype)

    # ----------------------------------------------------------------------------------------
    # vectors

    def random_chunks(
        self, m: int, seed: int, kind: str = "rademacher"
    ) -> tuple[int, Callable[[int], Pieces]]:
        """``m`` random vectors as ``(chunks, vectors)`` for :meth:`sweep`, drawn from ``seed``.

        The same seed gives the same vectors on every call and every rank: the generator is
        reseeded at chunk 0, and chunks are asked for in order.
        """
        k = self.chunk
        gen = torch.Generator(device=self.device)

        def vectors(c: int) -> Pieces:
            if c == 0:
                gen.manual_seed(seed)
            rows = min(k, m - c * k)
            out = []
            for shape in self.shapes:
                if kind == "rademacher":
                    t = torch.randint(
                        0, 2, (rows, *shape), generator=gen, dtype=self.dtype, device=self.device
                    )
                    out.append(t.mul_(2).sub_(1))
                else:
                    out.append(
                        torch.randn(
                            (rows, *shape), generator=gen, dtype=self.dtype, device=self.device
                        )
                    )
            return out

        return math.ceil(m / k), vectors

    def random_rows(self, m: int, seed: int, kind: str = "rademacher") -> torch.Tensor:
        """:math:`m` random vectors as rows ``(m, n)`` (Rademacher or Gaussian) from ``seed``."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if kind == "rademacher":
            t = torch.randint(
                0, 2, (m, self.n), generator=gen, dtype=self.dtype, device=self.device
            )
            return t.mul_(2).sub_(1)
        return torch.randn(m, self.n, generator=gen, dtype=self.dtype, device=self.device)

    def unflatten(self, flat: torch.Tensor, structure: Any) -> Any:
        """A flat vector as a tensor, a tuple, or a dict by parameter name (``structure``)."""
        pieces = [p.reshape(s) for p, s in zip(flat.split(self.sizes), self.shapes)]
        if structure == "tensor":
            return pieces[0]
        if structure == "sequence":
            return tuple(pieces)
        return dict(zip(structure, pieces))


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


def build(
    fn: str,
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    mode: str | None,
    data: Any,
    batch_weight: Any,
    distributed: bool,
    progress: Progress | None = None,
    eager: bool = False,
) -> tuple[HessianOperator, Any]:
    """Check the arguments every curvature function shares; the operator and the structure."""
    check_mode(fn, mode)
    tensors, structure = check_params(fn, params)
    data = check_data(fn, data)
    batch_weight = check_batch_weight(fn, batch_weight)
    check_distributed(fn, distributed)
    if batch_weight is not None and data is None:
        raise ValueError(f"{fn}: batch_weight= is only used with data=; pass data= too")
    op = HessianOperator(
        fn,
        loss_fn,
        tensors,
        param_names(params, len(tensors)),
        modules=[params] if isinstance(params, nn.Module) else [],
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        progress=progress,
        eager=eager,
    )
    return op, structure


def hessian_operator(
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    mode: str | None = "eval",
) -> HessianOperator:
    r"""The Hessian of a loss w.r.t. ``params`` as a linear operator (``matvec``, ``to_scipy``).

    :math:`H = \nabla^2_\theta L`, applied by double backward (no matrix is formed). With
    ``data=``, :math:`L = \sum_b w_b\, \texttt{loss\_fn}(b) / \sum_b w_b` over the batches, with
    :math:`w_b` the batch size (length of the batch's first tensor) unless ``batch_weight``
    says otherwise; each product then runs one forward/backward and one double backward per batch
    (a single batch's graph is kept). With ``distributed=True`` every rank passes its own shard as
    ``data=`` and every product is summed over the ranks, so all ranks get the Hessian of the loss
    on the union of the shards (call ``matvec`` on every rank, in the same order).

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or with ``data=``, ``loss_fn(batch)``.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        data: ``None``, or a re-iterable of batches (a list, a ``DataLoader``).
        batch_weight: ``batch_weight(batch) -> float``, the weight of a batch in the mean
            (default: the length of its first tensor).
        distributed: sum over the ranks of the initialised ``torch.distributed`` group.
        mode: with a module, ``"eval"`` (default), ``"train"`` or ``None`` while ``loss_fn`` runs;
            the flags and buffers are left as they were.

    Returns:
        A :class:`HessianOperator` with ``shape`` ``(n, n)``, ``dtype``, ``matvec(v)``,
        ``matmat(V)``, ``@`` and ``to_scipy()`` (a ``scipy.sparse.linalg.LinearOperator``).
        With ``data=None`` it holds the loss's gradient graph until it is dropped.

    Raises:
        TypeError: bad ``params``, ``data``, ``batch_weight``, ``distributed``, ``loss_fn``.
        ValueError: non-scalar loss, ``data`` empty or yielding non-batches,
            ``distributed=True`` without an initialised group or with different parameters on
            the ranks.
        GraphError: the loss does not depend on ``params``, or not on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> H = gl.hessian_operator(lambda: (w**4).sum(), w)  # diag(12 w^2)
        >>> H.shape, H.matvec(torch.tensor([1.0, 1.0]))
        ((2, 2), tensor([12., 48.]))
    """
    op, _ = build(
        "hessian_operator",
        loss_fn,
        params,
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        eager=True,
    )
    return op
