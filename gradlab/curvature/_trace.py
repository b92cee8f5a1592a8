r"""Trace of the Hessian (Hutchinson, Hutch++, exact) and per-block traces."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    ParamsArg,
    ProgressArg,
    check_choice,
    check_generator,
    check_mode,
    check_params,
    check_positive,
)
from gradlab.curvature._distributed import shared_seed
from gradlab.curvature._estimators import TRACE_METHODS, check_estimator, run_estimator
from gradlab.curvature._hutchinson import hutchinson_trace
from gradlab.curvature._operator import front, operator
from gradlab.curvature._progress import Progress

__all__ = ["hessian_trace", "hessian_trace_by_block"]

BlockArg = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | nn.Module


def hessian_trace(
    loss_fn: Callable[..., torch.Tensor],
    params: ParamsArg,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    progress: ProgressArg = False,
) -> torch.Tensor:
    r"""Trace of the Hessian of the loss w.r.t. ``params``.

    ``"hutchinson"``: :math:`\operatorname{tr} H \approx \frac1m \sum_i z_i^\top H z_i` with
    Rademacher probes :math:`z_i` (unbiased; standard error
    :math:`\sqrt{2\|H\|_F^2 - 2\sum_i H_{ii}^2}/\sqrt m`); exactly ``samples`` products per batch,
    all applied to one batch graph before the next is built.
    ``"hutch++"``: Hutch++ with ``samples`` Hessian-vector products in all: a third sketch
    :math:`Q = \operatorname{orth}(H S)`, the exact trace of :math:`Q^\top H Q`, and Hutchinson on
    the deflated rest (far lower variance when a few eigenvalues dominate).
    ``"exact"``: the sum of the exact diagonal (:func:`hessian_diagonal` with ``"exact"``).

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or ``loss_fn(batch)`` with ``data=``.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        samples: number of probes (``"hutch++"``: total products, at least 3).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: with a module, ``"eval"``, ``"train"`` or ``None`` (see the module docs).
        data: batches; the trace is that of the dataset-mean loss (see
            :func:`gradlab.hessian_operator`).
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: sum over the ranks of the ``torch.distributed`` group (each passes its shard).
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``
            (see the module docs); counts batches x Hessian-vector products (``samples``, or n
            for ``"exact"``, less n for each batch done by Hessian backpropagation, which runs
            none).

    Returns:
        A 0-dim tensor in the parameters' dtype.

    Raises:
        TypeError, ValueError: bad arguments (see :func:`gradlab.hessian_operator`).
        GraphError: the loss does not depend on ``params`` or on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gl.hessian_trace(lambda: (w**4).sum(), w, method="exact")  # 12 w^2
        tensor(60.)
    """
    fn = "hessian_trace"
    entry = check_estimator(fn, TRACE_METHODS, method, samples)
    f = front(fn, loss_fn, params, generator, mode, data, batch_weight, distributed, progress)
    return run_estimator(entry, f.op, samples, f.generator, f.progress)


def _blocks(
    fn: str, blocks: Mapping[str, BlockArg] | nn.Module
) -> tuple[list[str], list[list[torch.Tensor]], list[list[str]], list[nn.Module]]:
    """Block names, each block's tensors and their names, and the modules among the blocks."""
    if isinstance(blocks, nn.Module):
        named = [(n, p) for n, p in blocks.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{fn}: the module has no parameters with requires_grad; unfreeze some or pass "
                f"a dict of blocks"
            )
        return [n for n, _ in named], [[p] for _, p in named], [[n] for n, _ in named], [blocks]
    if not isinstance(blocks, Mapping):
        raise TypeError(
            f"{fn}: blocks is a {type(blocks).__name__}; pass a dict name -> tensor, sequence of "
            f"tensors or module (e.g. dict(model.named_children())), or a module (one block per "
            f"parameter)"
        )
    if not blocks:
        raise ValueError(f"{fn}: blocks is an empty dict; pass at least one block")
    names, groups, labels, modules = [], [], [], []
    skipped = []
    for name, block in blocks.items():
        if not isinstance(name, str):
            raise TypeError(f"{fn}: blocks has a key {name!r}; block names must be strings")
        if isinstance(block, nn.Module) and not any(p.requires_grad for p in block.parameters()):
            # e.g. an activation among named_children(): no Hessian block, skipped (said below)
            skipped.append(f"{name!r} ({type(block).__name__})")
            continue
        tensors, structure = check_params(f"{fn}: block {name!r}", block)
        names.append(name)
        groups.append(tensors)
        if isinstance(structure, list):
            labels.append([f"{name}.{s}" for s in structure])
        else:
            labels.append([f"block {name!r}[{j}]" for j in range(len(tensors))])
        if isinstance(block, nn.Module):
            modules.append(block)
    if not groups:
        raise ValueError(
            f"{fn}: blocks must hold parameters with requires_grad, got only blocks without any: "
            f"{', '.join(skipped)}. Pass blocks that hold trainable parameters"
        )
    if skipped:
        warnings.warn(
            f"{fn}: skipped block(s) {', '.join(skipped)}: they hold no parameters with "
            f"requires_grad, so they have no Hessian block; the result has no entry for them",
            UserWarning,
            stacklevel=3,
        )
    return names, groups, labels, modules


def hessian_trace_by_block(
    loss_fn: Callable[..., torch.Tensor],
    blocks: Mapping[str, BlockArg] | nn.Module,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    progress: ProgressArg = False,
) -> dict[str, torch.Tensor]:
    r"""Trace of each diagonal block of the Hessian: :math:`\operatorname{tr} H_{bb}` per block.

    Layer-wise curvature (PyHessian's per-layer trace): for a block :math:`b` of parameters,
    :math:`H_{bb}` is the Hessian of the loss w.r.t. that block alone (the others held fixed).
    One forward/backward builds the gradient of all the blocks' parameters; then
    ``"hutchinson"`` estimates each :math:`\operatorname{tr} H_{bb} \approx \frac1m \sum_i
    z_i^\top H_{bb} z_i` with ``samples`` Rademacher probes restricted to the block (zero
    elsewhere), so the off-block couplings :math:`H_{bc}` add no variance (cost:
    ``samples * len(blocks)`` Hessian-vector products). ``"exact"``: the sum of the exact
    Hessian diagonal over each block. When the blocks partition the parameters, the block traces
    sum to :math:`\operatorname{tr} H`. A parameter may appear in several blocks; each block's
    trace then counts it. A module block without trainable parameters (an activation among
    ``named_children()``) is skipped with a ``UserWarning`` naming it, and has no entry in the
    result.

    The per-block diagonal is :func:`hessian_diagonal` (its entries do not depend on the
    blocking): with a module it already returns ``{name: diagonal}`` per parameter.

    Args:
        loss_fn: ``loss_fn()`` returning a scalar loss, or ``loss_fn(batch)`` with ``data=``.
        blocks: a dict ``name -> block``, each block a tensor, a sequence of tensors or a module
            (its trainable parameters), e.g. ``dict(model.named_children())`` for one block per
            layer; or a module, for one block per trainable parameter (keys: parameter names).
        samples: number of probes per block for ``"hutchinson"``.
        method: ``"hutchinson"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: ``"eval"``, ``"train"`` or ``None``, applied to the modules among the blocks (or to
            ``blocks`` itself if it is a module), restored afterwards; with tensor blocks, set
            the model's mode yourself.
        data, batch_weight, distributed: as in :func:`hessian_trace`.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts batches x Hessian-vector products (``samples`` per non-empty block, or n for
            ``"exact"``).

    Returns:
        A dict with the keys of ``blocks`` (in order, blocks without parameters left out), each
        a 0-dim tensor in the parameters' dtype.

    Raises:
        TypeError: ``blocks`` is not a dict or a module, a block is not a tensor, sequence or
            module, or ``progress`` is not a bool or a callable.
        ValueError: empty ``blocks``, unknown method, bad ``samples``, non-scalar loss, params
            without grad.
        GraphError: the loss does not depend on the parameters, or not on some of them (named).

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.tensor([3.0], requires_grad=True)
        >>> loss_fn = lambda: (w**4).sum() + (b * w.sum()) ** 2
        >>> gl.hessian_trace_by_block(loss_fn, {"w": w, "b": b}, method="exact")
        {'w': tensor(96.), 'b': tensor(18.)}
    """
    fn = "hessian_trace_by_block"
    check_choice(fn, "method", method, ("hutchinson", "exact"))
    check_positive(fn, "samples", samples)
    check_mode(fn, mode)
    names, groups, labels, modules = _blocks(fn, blocks)
    gen = check_generator(fn, generator)
    prog = Progress(fn, progress)
    union: list[torch.Tensor] = []
    union_names: list[str] = []
    position: dict[int, int] = {}
    for group, group_labels in zip(groups, labels):
        for t, label in zip(group, group_labels):
            if id(t) not in position:
                position[id(t)] = len(union)
                union.append(t)
                union_names.append(label)
    if len({t.dtype for t in union}) > 1:
        raise TypeError(f"{fn}: the blocks mix dtypes; convert the model to one dtype")
    checked = (union, None, union_names, modules)  # no structure: results are per block
    op = operator(fn, loss_fn, checked, mode, data, batch_weight, distributed, progress=prog)
    masks = []
    for group in groups:
        mask = torch.zeros(op.n, dtype=op.dtype, device=op.device)
        for t in group:
            i = position[id(t)]
            mask[op.offsets[i] : op.offsets[i + 1]] = 1
        masks.append(mask)
    with prog.run(op.n if method == "exact" else samples * len(groups), op._batches):
        if method == "exact":
            diag = op._exact_diagonal()
            return {name: (diag * mask).sum() for name, mask in zip(names, masks)}
        seed = shared_seed(gen, op._distributed)
        traces = {}
        for b, (name, mask) in enumerate(zip(names, masks)):
            traces[name] = hutchinson_trace(op, samples, seed + b, rows=mask)
        return traces
