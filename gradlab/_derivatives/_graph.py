"""Building blocks of the strategies: argument substitution, torch.func's Jacobian structure,
the chunked forward Jacobian, row-by-row Jacobians, and the graph rule of the autograd loops.

**The graph rule.** ``torch.func`` returns a result with a graph when grad mode is on and the
result depends on a tensor that requires grad (an input, a tangent, or a tensor the function
closes over). The strategies built on ``torch.autograd.grad`` (``"loop"``, ``"double-backward"``,
the ``"reverse"`` k-th derivative) follow the same rule: they differentiate w.r.t. stand-ins of
the inputs (a view of an input that requires grad, so the graph reaches it; a fresh detached
leaf otherwise), run the function once, decide with :func:`wants_graph` whether the result must
carry a graph, and only then take the derivatives, with ``create_graph`` set accordingly (no
second-order graph is built when nobody can use it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._registry import check_deadline
from gradlab._derivatives._tree import flatten, unflatten
from gradlab._typing import PyTree

__all__ = ["assemble", "jac_forward_chunked", "rows", "stand_ins", "wants_graph", "with_diff"]

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


def stand_ins(
    args: tuple, nums: tuple[int, ...], grad_on: bool
) -> tuple[tuple, list[torch.Tensor], bool]:
    """Arguments with differentiable stand-ins for the leaves of ``args[nums]``.

    Call under ``torch.enable_grad()``. ``grad_on`` is the caller's grad mode.

    Returns:
        ``(full_args, stand_ins, any_input_requires_grad)``: a stand-in is a view of its input
        when grad mode is on and the input requires grad (the result's graph then reaches it),
        else a detached leaf that requires grad.
    """
    flat, spec = flatten(tuple(args[i] for i in nums))
    linked = grad_on and any(t.requires_grad for t in flat)
    zs = [
        t.view_as(t) if linked and t.requires_grad else t.detach().requires_grad_(True)
        for t in flat
    ]
    return with_diff(args, nums, unflatten(zs, spec)), zs, linked


def wants_graph(
    grad_on: bool,
    outs: Sequence[Any],
    zs: Sequence[torch.Tensor],
    linked: bool,
    reached: int | None = None,
) -> bool:
    """Whether results computed from ``outs`` must carry a graph, as torch.func's would.

    True when grad mode is on and ``outs`` depend on a tensor that requires grad other than the
    detached stand-ins ``zs``: ``linked`` (an input or tangent requires grad) or a leaf reached
    by walking the autograd graph of ``outs`` (a parameter or tensor ``f`` closes over).

    ``reached``: how many of ``zs`` have a gradient, when the caller took the gradients of
    ``outs`` w.r.t. ``zs`` already (with ``allow_unused=True``: those that are not ``None``).
    Each of those is a leaf the walk meets, so when it meets no more leaves than that (counting
    a leaf once per edge to it, so never fewer than there are distinct ones), they are all
    ``zs``, and none needs to be looked at.
    """
    if not grad_on:
        return False
    if linked:
        return True
    ours: set[int] | None = None
    stack = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.requires_grad:
            fn = o.grad_fn  # (once: each access makes the node's Python object anew)
            if fn is None:
                if ours is None:
                    ours = {id(z) for z in zs}
                if id(o) not in ours:
                    return True
            else:
                stack.append(fn)
    # The nodes themselves, not their ids: torch 2.8 and 2.11 (not 2.13) make a new Python object
    # for a node at each access once the last one is freed, so an id can come back for another.
    # This walk runs on every call of the autograd strategies: it asks a node's type, not for a
    # ``variable`` attribute that all but the leaves lack (a raised AttributeError each), and
    # records only the inner nodes it has seen (a leaf has nothing below it: one reached twice
    # is listed twice, which is cheaper than a set's add and look-up for every leaf).
    seen: set[Any] = set()
    met: list[Any] = []  # the leaves, once per edge to them
    push, add, meet = stack.append, seen.add, met.append
    leaf = _ACCUMULATE_GRAD
    while stack:
        for n, _ in stack.pop().next_functions:
            if n is None:
                continue
            if type(n) is leaf:
                meet(n)
            elif n not in seen:
                add(n)
                push(n)
    if len(met) == reached:
        return False
    if ours is None:
        ours = {id(z) for z in zs}
    for n in met:
        if id(n.variable) not in ours:
            return True
    return False


def with_diff(args: tuple, nums: tuple[int, ...], diff: Sequence[PyTree]) -> tuple:
    full = list(args)
    for i, d in zip(nums, diff):
        full[i] = d
    return tuple(full)


def assemble(
    out: PyTree,
    blocks: list[list[torch.Tensor]],
    args: tuple,
    nums: tuple[int, ...],
    many: bool,
) -> PyTree:
    """torch.func's Jacobian structure from per-output-leaf lists of per-input-leaf blocks."""
    out_leaves, out_spec = pytree.tree_flatten(out)
    specs = [pytree.tree_flatten(args[i]) for i in nums]
    per_out = []
    for _o, flat in zip(out_leaves, blocks):
        parts = []
        pos = 0
        for leaves, spec in specs:
            parts.append(pytree.tree_unflatten(flat[pos : pos + len(leaves)], spec))
            pos += len(leaves)
        per_out.append(tuple(parts) if many else parts[0])
    return pytree.tree_unflatten(per_out, out_spec)


def jac_forward_chunked(
    f: Callable[..., Any], args: tuple, nums: tuple[int, ...], many: bool, chunk_size: int
) -> PyTree:
    """jacfwd with ``chunk_size``: vmap of jvp over chunks of the input basis."""
    diff = tuple(args[i] for i in nums)
    flat, spec = pytree.tree_flatten(diff)
    sizes = [t.numel() for t in flat]
    total = sum(sizes)
    ref = flat[0]

    def g(*d: Any) -> Any:
        return f(*with_diff(args, nums, d))

    def push(e: torch.Tensor) -> Any:
        pieces = [p.reshape(t.shape).to(t.dtype) for p, t in zip(torch.split(e, sizes), flat)]
        return torch.func.jvp(g, diff, tuple(pytree.tree_unflatten(pieces, spec)))

    basis = torch.eye(
        total, dtype=ref.real.dtype if ref.is_complex() else ref.dtype, device=ref.device
    )
    value, tangents = torch.func.vmap(push, chunk_size=chunk_size)(basis)
    out_leaves = pytree.tree_leaves(tangents)
    blocks = []
    for o in out_leaves:
        moved = o.movedim(0, -1)  # (*out_shape, total)
        oshape = moved.shape[:-1]
        blocks.append(
            [
                b.reshape(tuple(oshape) + tuple(t.shape))
                for b, t in zip(torch.split(moved, sizes, dim=-1), flat)
            ]
        )
    value = pytree.tree_map(lambda v: v[0], value)
    return assemble(value, blocks, args, nums, many)


def rows(
    out: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool = False
) -> list[torch.Tensor]:
    """Row-by-row Jacobian of one output w.r.t. several inputs, one autograd.grad per row."""
    if not out.requires_grad:
        return [t.new_zeros(tuple(out.shape) + tuple(t.shape)) for t in inputs]
    flat_out = out.reshape(-1)
    acc: list[list[torch.Tensor]] = [[] for _ in inputs]
    for k in range(flat_out.numel()):
        check_deadline()  # a timed candidate stops as soon as it cannot win
        gs = torch.autograd.grad(
            flat_out[k], inputs, retain_graph=True, allow_unused=True, create_graph=create_graph
        )
        for j, (g, t) in enumerate(zip(gs, inputs)):
            acc[j].append(torch.zeros_like(t) if g is None else g)
    return [
        torch.stack(r).reshape(tuple(out.shape) + tuple(t.shape))
        if r
        else t.new_zeros(tuple(out.shape) + tuple(t.shape))
        for r, t in zip(acc, inputs)
    ]
