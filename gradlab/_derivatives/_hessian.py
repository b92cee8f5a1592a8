"""``hessian``: its strategy registry and the public function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._checks import Argnums, ArgnumsProblem, scalar
from gradlab._derivatives._dispatch import dispatch
from gradlab._derivatives._graph import assemble, jac_forward_chunked, rows, stand_ins, wants_graph
from gradlab._derivatives._registry import Operation
from gradlab._typing import PyTree, TensorFn

__all__ = ["HESSIAN", "hessian"]


def _rev_rev(p: ArgnumsProblem) -> PyTree:
    g = torch.func.grad(scalar("hessian", p.f), p.argnums)
    return torch.func.jacrev(g, p.argnums, chunk_size=p.chunk_size)(*p.args)


def _fwd_rev(p: ArgnumsProblem) -> PyTree:
    g = torch.func.grad(scalar("hessian", p.f), p.argnums)
    if p.chunk_size is None:
        return torch.func.jacfwd(g, p.argnums)(*p.args)
    return jac_forward_chunked(g, p.args, p.nums, p.many, p.chunk_size)


def _loop(p: ArgnumsProblem) -> PyTree:
    grad_on = torch.is_grad_enabled()
    with torch.enable_grad():
        full, zs, linked = stand_ins(p.args, p.nums, grad_on)
        out = scalar("hessian", p.f)(*full)
        keep = wants_graph(grad_on, [out], zs, linked)
        gs: Sequence[torch.Tensor | None] = [None] * len(zs)
        if out.requires_grad:
            gs = torch.autograd.grad(out, zs, create_graph=True, allow_unused=True)
        blocks = [
            rows(torch.zeros_like(z) if g is None else g, zs, create_graph=keep)
            for g, z in zip(gs, zs)
        ]
    spec = pytree.tree_flatten(tuple(p.args[i] for i in p.nums))[1]
    grads = pytree.tree_unflatten([torch.zeros_like(z) for z in zs], spec)  # structure only
    return assemble(grads if p.many else grads[0], blocks, p.args, p.nums, p.many)


def _heuristic(p: ArgnumsProblem, H: PyTree) -> str:
    """``"rev-rev"``: the fastest on every case of the ``derivatives`` benchmark suite."""
    return "rev-rev"


HESSIAN: Operation[ArgnumsProblem] = Operation(
    name="hessian",
    strategies={"rev-rev": _rev_rev, "fwd-rev": _fwd_rev, "loop": _loop},
    first="rev-rev",
    heuristic=_heuristic,
    fallback={"fwd-rev": "rev-rev"},
    forward_ad=frozenset({"fwd-rev"}),
    steps=frozenset({"loop"}),
)


def hessian(
    f: TensorFn,
    *args: Any,
    argnums: Argnums = 0,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> PyTree:
    r"""Hessian :math:`H_{ij} = \partial^2 f / \partial x_i \partial x_j` of a scalar function.

    Strategies (the same values and the same differentiability, different cost; the
    ``derivatives`` benchmark suite compares them, ``benchmarks/RESULTS.md``):

    ``"rev-rev"``
        ``jacrev(grad(f))``: reverse over reverse.
    ``"fwd-rev"``
        ``jacfwd(grad(f))``: forward over reverse, what ``torch.func.hessian`` does.
    ``"loop"``
        a gradient with ``create_graph=True``, then one ``torch.autograd.grad`` per gradient
        element (least memory).
    ``"auto"`` (default)
        the heuristic ``"rev-rev"``, replaced by a measured strategy that is clearly faster
        (cost of the first call, random functions, threads: ``help(gradlab.autotune)``).

    The result carries a graph, whatever the strategy, when grad mode is on and it depends on a
    tensor that requires grad (an input or a tensor ``f`` closes over), as ``torch.func``'s does.

    Args:
        f: a function returning a scalar (0-dim) tensor.
        *args: its positional arguments (tensors, tuples or dicts of tensors).
        argnums: which arguments to differentiate by (an int or a tuple of ints).
        strategy: one of the names above.
        chunk_size: compute at most this many Hessian rows at a time.

    Returns:
        ``torch.func.hessian``'s structure: one block of shape ``x.shape + x.shape`` for a tensor,
        dicts of dicts for a dict of parameters, ``H[i][j]`` tuples for a tuple ``argnums``.

    Raises:
        ValueError: ``f`` does not return a 0-dim tensor, unknown strategy (the message lists the
            valid ones), ``argnums`` out of range, ``"fwd-rev"`` on a function forward mode
            cannot run (no forward-mode formula, code under ``torch.no_grad()`` or in a custom
            ``autograd.Function``; ``"auto"`` falls back to ``"rev-rev"`` there).
        TypeError: integer or non-tensor inputs to differentiate by, ``f`` not callable.

    Example:
        >>> import gradlab as gl
        >>> gl.hessian(lambda x: (x[0] ** 2) * x[1], torch.tensor([1.0, 2.0]))
        tensor([[4., 2.],
                [2., 0.]])
    """
    HESSIAN.check(strategy)
    problem = ArgnumsProblem.validated("hessian", f, args, argnums, chunk_size)
    return dispatch(HESSIAN, strategy, problem)
