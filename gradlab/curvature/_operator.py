r"""The Hessian of a loss as a linear operator: one batch, a whole dataset, or across ranks.

:class:`HessianOperator` is what every curvature estimator is written against. A product
:math:`Hv` is a double backward through the first-order gradient graph of the loss (the one
engine, :class:`gradlab._derivatives._hvp_engine.GradGraph`, shared with :func:`gradlab.hvp`):

- ``data=None``: the loss is ``loss_fn()``; its gradient graph is built once and kept, so each
  product costs one double backward (what a hand-written PyHessian-style loop pays, less the
  Python checks of ``torch.autograd.grad``: one-vector products call the engine directly, see
  :func:`gradlab._derivatives._hvp_engine.engine_grad`). A ``hessian_*`` function's own
  operator frees the graph in its last product.
- ``data=batches``: the loss is the dataset mean
  :math:`L = \sum_b w_b L_b / \sum_b w_b` of the batch losses ``loss_fn(batch)``, with
  :math:`w_b` the batch size (the length of the batch's first tensor) or ``batch_weight(batch)``;
  so :math:`Hv = \sum_b w_b H_b v / \sum_b w_b`. One batch graph is alive at a time (memory does
  not grow with the number of batches: a batch's last product frees its graph as it runs, before
  the next batch's forward); every pass over the data rebuilds each batch's graph (one
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from gradlab._derivatives._hvp_engine import GradGraph
from gradlab._errors import GraphError
from gradlab.curvature import _distributed as dist_
from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
    check_batch_weight,
    check_data,
    check_distributed,
    check_generator,
    check_loss_closure,
    check_mode,
    check_params,
    param_names,
)
from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._exact_diagonal import hessian_exact_diagonal
from gradlab.curvature._progress import Progress
from gradlab.curvature._state import model_state

__all__ = ["BATCHED_MAX_N", "HessianOperator", "hessian_operator"]

BATCHED_MAX_N = 4096  # batched (vmapped) products up to this many entries, see the module docs
_MAX_CHUNK = 64  # vectors per batched backward


class HessianOperator(CurvatureOperator):
    """The Hessian of a loss w.r.t. some parameters, as a symmetric linear operator.

    Made by :func:`hessian_operator` (and internally by every ``hessian_*`` function). Vectors
    are flat, over the parameters in order (``torch.cat([p.flatten() for p in params])``), or
    per-parameter pieces (``H @ [v1, v2, ...]``, :meth:`apply`).

    Attributes:
        shape: ``(n, n)`` with ``n`` the number of parameter entries.
        dtype: the parameters' dtype (also that of the products).
        device: the parameters' device.
        params: the parameter tensors.

    Example:
        >>> import gradlab as gl
        >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.ones(1, requires_grad=True)
        >>> H = gl.hessian_operator(lambda: (a**3).sum() + a[0] * (b**2).sum(), [a, b])
        >>> H.shape, H.dtype, len(H.params)
        ((3, 3), torch.float32, 2)
        >>> H @ torch.tensor([1.0, 0.0, 0.0])  # a flat vector over (a, b): the first column
        tensor([6., 0., 2.])
        >>> H @ [torch.ones(2), torch.ones(1)]  # per-parameter pieces in, pieces out
        [tensor([ 8., 12.]), tensor([4.])]
        >>> H.matmat(torch.eye(3))  # the dense matrix, column by column (small n only)
        tensor([[ 6.,  0.,  2.],
                [ 0., 12.,  0.],
                [ 2.,  0.,  2.]])
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
        check_loss_closure(fn, loss_fn, data)
        self.params = list(params)
        self.names = list(names)
        n = sum(p.numel() for p in self.params)
        super().__init__(
            fn,
            [p.shape for p in self.params],
            self.params[0].dtype,
            self.params[0].device,
            data=data,
            batch_weight=batch_weight,
            distributed=distributed,
            progress=progress,
            chunk=1 if n > BATCHED_MAX_N else _MAX_CHUNK,
        )
        self._loss_fn = loss_fn
        self._modules = list(modules)
        self._mode = mode
        self._batched = self._chunk > 1
        self._batch_ran = False  # a vmapped product has run (so one cannot fail part way)
        self._checked = False  # unused parameters checked after the first pass
        self._used = [0] * len(self.params)  # batches whose graph reaches each parameter
        if distributed:
            if data is None:
                raise ValueError(
                    f"{fn}: distributed=True needs data= (each rank's own shard of batches; "
                    f"loss_fn(batch) is called per batch)"
                )
            dist_.check_group(fn)
            dist_.check_same_shapes(fn, self.names, self.params)
        if eager and data is None:  # one graph, built now (errors show at once) and kept
            for _ in self._states():
                pass

    # ----------------------------------------------------------------------------------------
    # batches and graphs

    def _loss(self, batch: Any, index: int | None) -> torch.Tensor:
        fn = self._fn
        with torch.enable_grad():
            if self._modules:
                with contextlib.ExitStack() as stack:
                    for module in self._modules:
                        stack.enter_context(model_state(module, self._mode))
                    loss = self._loss_fn() if index is None else self._loss_fn(batch)
            else:  # tensors given as params: nothing to set or shield
                loss = self._loss_fn() if index is None else self._loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{fn}: loss_fn must return a scalar tensor, got {got}; reduce the loss "
                f"(e.g. .mean())"
            )
        if not loss.requires_grad:
            raise GraphError(
                f"{fn}: the loss does not depend on params (no grad_fn); check that loss_fn "
                f"uses the parameters you passed, with grad enabled"
            )
        if loss.dim() == 0:
            return loss
        with torch.enable_grad():
            return loss.reshape(())

    def _closures(self) -> Iterator[tuple[Callable[[], torch.Tensor], float]]:
        """Each batch as ``(loss closure, weight)``; counts batches and weight on a first pass."""
        for batch, index, w in self._iter_data():
            yield functools.partial(self._loss, batch, index), w

    def _graph_of(self, closure: Callable[[], torch.Tensor]) -> GradGraph:
        graph = GradGraph(closure(), self.params)
        for i in range(len(self.params)):
            if i not in graph.unused:
                self._used[i] += 1
        return graph

    def _prepare(self, batch: Any, index: int | None) -> GradGraph:
        return self._graph_of(functools.partial(self._loss, batch, index))

    def _after_pass(self) -> None:
        self._check_unused()

    def _check_unused(self) -> None:
        if self._checked:
            return
        used = self._used
        if self._distributed:
            used = self._reduced(torch.tensor(used, dtype=torch.int64)).tolist()
        missing = [self.names[i] for i in range(len(self.params)) if int(used[i]) == 0]
        if missing:
            raise GraphError(
                f"{self._fn}: the loss does not use {', '.join(missing)}; its Hessian rows are "
                f"undefined there. Pass only the parameters the loss uses (e.g. freeze the others "
                f"with requires_grad_(False))"
            )
        self._checked = True

    # ----------------------------------------------------------------------------------------
    # products

    def _batch_products(self, graph: GradGraph, V: Pieces, spend: bool = False) -> Pieces:
        """H_b applied to the k vectors in ``V`` (pieces with a leading dimension k).

        ``spend``: the graph's last use; its last backward frees the saved tensors as it goes
        (``retain_graph=False``). A vmapped product spends it only once one has run on this
        model: a first one that fails part way (an op without a batching rule) must leave the
        graph whole for the one-at-a-time fallback.
        """
        k = V[0].shape[0]
        if k > 1 and self._batched:
            try:
                out = graph.hvp(V, batched=True, retain_graph=not (spend and self._batch_ran))
            except RuntimeError:  # an op without a batching rule: one at a time from now on
                if spend and self._batch_ran:  # the graph may be part spent: no fallback on it
                    raise
                self._batched = False
            else:
                self._batch_ran = True
                return out
        if k == 1:
            return [h.unsqueeze(0) for h in graph.hvp([v[0] for v in V], retain_graph=not spend)]
        last = k - 1 if spend else -1
        cols = [graph.hvp([v[j] for v in V], retain_graph=j != last) for j in range(k)]
        return [torch.stack(hs) for hs in zip(*cols)]

    def _last_products(self, graph: GradGraph, V: Pieces) -> Pieces:
        return self._batch_products(graph, V, spend=True)

    def _apply_one(self, graph: GradGraph, vs: Pieces) -> Pieces:
        return graph.hvp(vs)

    def _exact_diagonal(self) -> torch.Tensor:
        return hessian_exact_diagonal(self)

    def apply(self, vs: Sequence[torch.Tensor]) -> Pieces:
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
        return super().apply(vs)


# Parameters checked by _checked_params: tensors, structure (to shape flat results), names, and
# the module among them
Checked = tuple[list[torch.Tensor], Any, list[str], list[nn.Module]]


def operator(
    fn: str,
    loss_fn: Callable[..., torch.Tensor],
    checked: Checked,
    mode: str | None,
    data: Any,
    batch_weight: Any,
    distributed: bool,
    *,
    progress: Progress | None = None,
    eager: bool = False,
) -> HessianOperator:
    """Check the options every curvature function shares (in the order of its signature); the
    operator on the checked parameters."""
    check_mode(fn, mode)
    data = check_data(fn, data)
    batch_weight = check_batch_weight(fn, batch_weight)
    check_distributed(fn, distributed)
    if batch_weight is not None and data is None:
        raise ValueError(f"{fn}: batch_weight= is only used with data=; pass data= too")
    tensors, _, names, modules = checked
    return HessianOperator(
        fn,
        loss_fn,
        tensors,
        names,
        modules=modules,
        mode=mode,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        progress=progress,
        eager=eager,
    )


def _checked_params(fn: str, params: ParamsArg, mode: str | None) -> Checked:
    """``params`` checked: its tensors, structure and names, and the module among them."""
    check_mode(fn, mode)
    tensors, structure = check_params(fn, params)
    modules = [params] if isinstance(params, nn.Module) else []
    return tensors, structure, param_names(params, len(tensors)), modules


class Front(NamedTuple):
    """What a ``hessian_*`` estimator's front end checks and builds (see :func:`front`)."""

    op: HessianOperator
    structure: Any  # how to shape a flat result like ``params`` (``op._unflatten``)
    generator: torch.Generator | None
    progress: Progress


def front(
    fn: str,
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    generator: GeneratorArg,
    mode: str | None,
    data: Any,
    batch_weight: Any,
    distributed: bool,
    progress: ProgressArg,
) -> Front:
    """The arguments every ``hessian_*`` estimator shares (in its signature's order), checked:
    the generator, the progress counter and the operator counting on it."""
    checked = _checked_params(fn, params, mode)
    gen = check_generator(fn, generator)
    prog = Progress(fn, progress)
    op = operator(fn, loss_fn, checked, mode, data, batch_weight, distributed, progress=prog)
    op._disposable = True  # the caller's own: its estimator's last sweep may free the graph
    return Front(op, checked[1], gen, prog)


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
    fn = "hessian_operator"
    checked = _checked_params(fn, params, mode)
    return operator(fn, loss_fn, checked, mode, data, batch_weight, distributed, eager=True)
