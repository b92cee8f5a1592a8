"""``jacobian``: its strategy registry and the public function."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._checks import Argnums, ArgnumsProblem, numel, outputs
from gradlab._derivatives._dispatch import dispatch
from gradlab._derivatives._graph import assemble, jac_forward_chunked, rows, stand_ins, wants_graph
from gradlab._derivatives._registry import Operation
from gradlab._typing import PyTree, TensorFn

__all__ = ["JACOBIAN", "jacobian"]


def _reverse(p: ArgnumsProblem) -> PyTree:
    return torch.func.jacrev(outputs("jacobian", p.f), p.argnums, chunk_size=p.chunk_size)(*p.args)


def _forward(p: ArgnumsProblem) -> PyTree:
    f = outputs("jacobian", p.f)
    if p.chunk_size is None:
        return torch.func.jacfwd(f, p.argnums)(*p.args)
    return jac_forward_chunked(f, p.args, p.nums, p.many, p.chunk_size)


def _loop(p: ArgnumsProblem) -> PyTree:
    grad_on = torch.is_grad_enabled()
    with torch.enable_grad():
        full, zs, linked = stand_ins(p.args, p.nums, grad_on)
        out = outputs("jacobian", p.f)(*full)
        leaves = pytree.tree_leaves(out)
        keep = wants_graph(grad_on, leaves, zs, linked)
        blocks = [rows(o, zs, create_graph=keep) for o in leaves]
    return assemble(pytree.tree_map(torch.Tensor.detach, out), blocks, p.args, p.nums, p.many)


def _heuristic(p: ArgnumsProblem, J: PyTree) -> str:
    """``"reverse"`` if the output has at most as many elements as the inputs, else forward."""
    n_in = numel(tuple(p.args[i] for i in p.nums))
    n_out = p.n_out = numel(J) // max(n_in, 1)
    return "reverse" if n_out <= n_in else "forward"


# Beyond this size ratio the heuristic's direction wins (the other runs one vectorised product
# per element of the larger side), so "auto" does not time the other direction: a vectorised
# candidate cannot be abandoned midway, and timing it would cost that ratio.
_TIMED_RATIO = 2.0


def _candidates(p: ArgnumsProblem) -> list[str]:
    names = list(JACOBIAN.names)
    if p.n_out is None:
        return names
    n_in = max(numel(tuple(p.args[i] for i in p.nums)), 1)
    n_out = max(p.n_out, 1)
    if n_in > _TIMED_RATIO * n_out:
        names.remove("forward")
    elif n_out > _TIMED_RATIO * n_in:
        names.remove("reverse")
    return names


JACOBIAN: Operation[ArgnumsProblem] = Operation(
    name="jacobian",
    strategies={"reverse": _reverse, "forward": _forward, "loop": _loop},
    first="reverse",
    heuristic=_heuristic,
    fallback={"forward": "reverse"},
    forward_ad=frozenset({"forward"}),
    candidates=_candidates,
    steps=frozenset({"loop"}),
)


def jacobian(
    f: TensorFn,
    *args: Any,
    argnums: Argnums = 0,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> PyTree:
    r"""Jacobian :math:`J_{ij} = \partial f_i / \partial x_j` of ``f`` at ``args``.

    Strategies (the same values and the same differentiability, different cost):

    ``"reverse"``
        ``torch.func.jacrev``: one vectorised vector-Jacobian product per output element, cheap
        when the output is smaller than the input.
    ``"forward"``
        ``torch.func.jacfwd``: one vectorised Jacobian-vector product per input element, cheap
        when the input is smaller than the output (with ``chunk_size``, gradlab's own chunked
        ``vmap`` over ``torch.func.jvp``).
    ``"loop"``
        one ``torch.autograd.grad`` call per output element (the textbook loop; least memory,
        works for every op with a backward).
    ``"auto"`` (default)
        the heuristic, ``"reverse"`` if the output has at most as many elements as the
        differentiated inputs, else ``"forward"`` (the first call of a signature runs
        ``"reverse"`` to learn the output size), replaced by a measured strategy that is clearly
        faster (cost of the first call, random functions, threads: ``help(gradlab.autotune)``).
        Under ``"auto"`` a function without forward-mode formulas (or running code without grad,
        which forward mode would differentiate through) falls back to ``"reverse"``.

    The result carries a graph, whatever the strategy, when grad mode is on and it depends on a
    tensor that requires grad (an input or a tensor ``f`` closes over), as ``torch.func``'s does.

    Args:
        f: the function; its output may be a tensor or a pytree of tensors.
        *args: its positional arguments (tensors, tuples or dicts of tensors).
        argnums: which arguments to differentiate by (an int or a tuple of ints).
        strategy: one of the names above.
        chunk_size: compute at most this many rows/columns at a time (less memory, slower).

    Returns:
        ``torch.func``'s structure: for each output leaf, the Jacobian w.r.t. ``args[argnums]``
        (a tuple over ``argnums`` when it is a tuple), each block of shape
        ``out.shape + in.shape``.

    Raises:
        ValueError: unknown strategy (the message lists the valid ones), ``argnums`` out of range,
            bad ``chunk_size``, ``"forward"`` on a function it cannot run (ops without
            forward-mode formulas, code under ``torch.no_grad()`` or in a custom
            ``autograd.Function``).
        TypeError: integer or non-tensor inputs to differentiate by, ``f`` not callable.

    Example:
        >>> import gradlab as gl
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> gl.jacobian(lambda x: W @ x, torch.ones(2), strategy="forward")
        tensor([[1., 2.],
                [3., 4.],
                [5., 6.]])
    """
    JACOBIAN.check(strategy)  # before the arguments: a bad name is reported first
    problem = ArgnumsProblem.validated("jacobian", f, args, argnums, chunk_size)
    return dispatch(JACOBIAN, strategy, problem)
