"""``hvp`` (its strategy registry), ``vjp`` and ``jvp``: products with a vector, and the value."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from gradlab._derivatives._autotune import cached, run_keyed, steady
from gradlab._derivatives._checks import (
    call_scalar,
    check_call,
    check_like,
    devices_of,
    primals,
    scalar,
)
from gradlab._derivatives._dispatch import dispatch
from gradlab._derivatives._graph import wants_graph
from gradlab._derivatives._hvp_engine import engine_grad, hvp_once
from gradlab._derivatives._keys import function_key, leaf_signature
from gradlab._derivatives._registry import FORWARD_AD_LOCK, Operation
from gradlab._derivatives._tree import flatten, flatten_one, unflatten, unflatten_one
from gradlab._typing import PyTree, TensorFn
from gradlab._validate import check_callable

__all__ = ["HVP", "HVP_OP", "JVP", "VJP", "HvpProblem", "hvp", "jvp", "vjp"]

_Tensor = torch.Tensor
_new_tuple = tuple.__new__


class HVP(NamedTuple):
    """Result of :func:`hvp`: the function's value and the Hessian-vector product.

    Example:
        >>> import gradlab as gl
        >>> f = lambda x, y: (x**2 * y).sum()
        >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
        >>> r = gl.hvp(f, (x, y), (torch.ones(2), torch.zeros(2)))
        >>> r.value  # f(x, y)
        tensor(19.)
        >>> r.hvp  # structured like (x, y): d2f/dx2 @ 1 = 2 y, d2f/dydx @ 1 = 2 x
        (tensor([6., 8.]), tensor([2., 4.]))
    """

    value: torch.Tensor
    hvp: PyTree


class VJP(NamedTuple):
    """Result of :func:`vjp`: the function's value and ``v^T J`` (structured like the args).

    Example:
        >>> import gradlab as gl
        >>> value, vjp = gl.vjp(lambda x: x**2, torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
        >>> value, vjp  # x**2 and 1^T diag(2 x)
        (tensor([1., 4., 9.]), tensor([2., 4., 6.]))
    """

    value: PyTree
    vjp: PyTree


class JVP(NamedTuple):
    """Result of :func:`jvp`: the function's value and ``J v`` (structured like the output).

    Example:
        >>> import gradlab as gl
        >>> r = gl.jvp(lambda x: (x**2, x.sum()), torch.tensor([1.0, 2.0]), torch.ones(2))
        >>> r.value  # f's output: a tuple here
        (tensor([1., 4.]), tensor(3.))
        >>> r.jvp  # structured like it
        (tensor([2., 4.]), tensor(2.))
    """

    value: PyTree
    jvp: PyTree


class HvpProblem:
    """A validated ``hvp`` call: ``f(*primals)``, tangents structured like the primals.

    The two trees are flattened once per call (:attr:`flat`), for the cache key and for
    ``"double-backward"``: they are walked on every call, so once is what it costs. A plain
    slotted class, not a frozen dataclass: it is built on every call (as
    :class:`~gradlab._derivatives._checks.ArgnumsProblem`).
    """

    __slots__ = ("f", "flat", "primals", "tangents")
    keep = None  # results keep a graph when grad mode is on (see Operation.run)

    def __init__(
        self, f: TensorFn, primals: tuple, tangents: tuple, flat: tuple | None = None
    ) -> None:
        """``flat``: the two trees flattened, when the caller did that already (:func:`hvp`)."""
        self.f = f
        self.primals = primals
        self.tangents = tangents
        if flat is None:
            p_leaves, p_spec = flatten(primals)
            t_leaves, t_spec = flatten(tangents)
            flat = (p_leaves, p_spec, t_leaves, t_spec)
        # (primal leaves, primal spec, tangent leaves, tangent spec) (_tree.flatten)
        self.flat: tuple[list[Any], Any, list[Any], Any] = flat

    def key(self) -> tuple:
        """Both trees' structure and per-leaf shape, dtype, device and ``requires_grad``, and the
        grad mode: everything the argument checks look at (see :func:`hvp`, which builds the same
        key itself)."""
        p_leaves, p_spec, t_leaves, t_spec = self.flat
        return (p_spec, t_spec, _signatures(p_leaves + t_leaves), torch.is_grad_enabled())

    def devices(self) -> Sequence[torch.device]:
        return devices_of(self.primals)


def _signatures(leaves: list[Any]) -> tuple:
    """One signature per leaf (the primals' then the tangents': the two specs say how many of
    each): tensors keyed inline (the usual leaves, on every "auto" call), the rest through
    :func:`~gradlab._derivatives._keys.leaf_signature` (the checks of a cache miss then refuse
    them)."""
    return tuple(
        [
            (t.shape, t.dtype, t.device, t.requires_grad)
            if isinstance(t, _Tensor)
            else leaf_signature(t)
            for t in leaves
        ]
    )


def _fwd_rev(p: HvpProblem) -> tuple[Any, Any]:
    nums = tuple(range(len(p.primals)))
    res: Any = torch.func.jvp(
        torch.func.grad_and_value(scalar("hvp", p.f), nums), p.primals, p.tangents
    )
    (_, value), (hv, _) = res
    return value, hv


def _rev_rev(p: HvpProblem) -> tuple[Any, Any]:
    nums = tuple(range(len(p.primals)))
    res: Any = torch.func.vjp(
        torch.func.grad_and_value(scalar("hvp", p.f), nums), *p.primals, has_aux=True
    )
    _, vjp_fn, value = res
    return value, vjp_fn(p.tangents)


def _double_backward(p: HvpProblem) -> tuple[Any, Any]:
    """The shared engine (:func:`~gradlab._derivatives._hvp_engine.hvp_once`) behind a graph-rule
    wrapper: :func:`_double_backward_leaves` on the flattened trees (:attr:`HvpProblem.flat`)."""
    p_leaves, spec, t_leaves, _ = p.flat
    value, res = _double_backward_leaves(p.f, p_leaves, spec, t_leaves)
    return value, unflatten(res, spec)


def _double_backward_leaves(
    f: TensorFn, p_leaves: list[Any], spec: Any, t_leaves: list[Any], grad_on: bool | None = None
) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """``(value, H v as a list of leaves)`` of ``f(*unflatten(p_leaves, spec))``, tangent leaves
    ``t_leaves``: what ``"double-backward"`` runs, and what :func:`hvp` calls directly when
    ``"auto"`` finds it chosen (the strategy less its wrapping, which only rebuilds the tree).

    Written out (rather than with :func:`~gradlab._derivatives._graph.stand_ins`) and in one
    function, because it runs on every call of the common ``hvp``. Grad mode is switched on only
    when it is off (``grad_on``: the caller's grad mode, given by the call that switched it).
    The first-order gradients are taken before the graph rule is decided (they need
    ``create_graph=True`` either way): :func:`wants_graph` then only counts the leaves it meets
    against the inputs that have a gradient, instead of looking at each.
    """
    if grad_on is None:
        grad_on = torch.is_grad_enabled()
        if not grad_on:
            with torch.enable_grad():
                return _double_backward_leaves(f, p_leaves, spec, t_leaves, False)
    linked = False
    if grad_on:
        for t in p_leaves:  # loops, not any() over a generator: this runs on every call
            if t.requires_grad:
                linked = True
                break
    if linked:
        zs = [
            t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True) for t in p_leaves
        ]
    else:
        zs = [t.detach().requires_grad_(True) for t in p_leaves]
    value = call_scalar("hvp", f, unflatten(zs, spec))
    if not value.requires_grad:
        keep_value = wants_graph(grad_on, [value], zs, linked)
        res: Sequence[torch.Tensor] = [torch.zeros_like(z) for z in zs]
    else:
        grads = engine_grad((value,), zs, None, True, True)  # autograd.grad, less its wrapping
        reached = 0
        for g in grads:
            if g is not None:
                reached += 1
        keep_value = wants_graph(grad_on, [value], zs, linked, reached)  # v: not in the value
        keep = keep_value
        if grad_on and not keep:
            for t in t_leaves:
                if t.requires_grad:
                    keep = True
                    break
        res = hvp_once(value, zs, t_leaves, create_graph=keep, grads=grads)
    return (value if keep_value else value.detach()), res


def _heuristic(p: HvpProblem, result: Any) -> str:
    """``"double-backward"``: the fastest on every case of the ``derivatives`` suite."""
    return "double-backward"


HVP_OP: Operation[HvpProblem] = Operation(
    name="hvp",
    strategies={"double-backward": _double_backward, "fwd-rev": _fwd_rev, "rev-rev": _rev_rev},
    first="double-backward",
    heuristic=_heuristic,
    fallback={"fwd-rev": "rev-rev"},
    forward_ad=frozenset({"fwd-rev"}),
)


def hvp(f: TensorFn, args: Any, v: Any, *, strategy: str = "auto") -> HVP:
    r"""Hessian-vector product :math:`H v` of a scalar function, and its value.

    ``args`` are ``f``'s arguments: a tensor or a dict (``f(args)``) or a tuple (``f(*args)``);
    the Hessian is taken w.r.t. all of them and ``v`` is structured exactly like ``args``.

    Strategies (the same values and the same differentiability, different cost; the
    ``derivatives`` benchmark suite compares them, ``benchmarks/RESULTS.md``):

    ``"double-backward"``
        ``autograd.grad`` with ``create_graph=True``, then ``autograd.grad(g, x, v)``: gradlab's
        one HVP engine, shared with the curvature functions.
    ``"fwd-rev"``
        ``jvp(grad(f))``: forward over reverse (the usual advice).
    ``"rev-rev"``
        ``vjp(grad(f))`` with ``v`` as cotangent (the Hessian is symmetric).
    ``"auto"`` (default)
        the heuristic ``"double-backward"``, replaced by a measured strategy that is clearly
        faster (cost of the first call, random functions, threads: ``help(gradlab.autotune)``).

    ``value`` and ``hvp`` carry a graph, whatever the strategy, when grad mode is on and they
    depend on a tensor that requires grad (``args``, ``v``, or a tensor ``f`` closes over), as
    ``torch.func``'s do; otherwise they are detached.

    Args:
        f: a function returning a scalar (0-dim) tensor.
        args: its argument(s), see above.
        v: the vector, structured like ``args`` with the same shapes, dtypes and devices.
        strategy: one of the names above.

    Returns:
        ``HVP(value, hvp)``, always: ``value`` is ``f(*args)``, ``hvp`` is structured like
        ``args`` (a tensor for a tensor, a tuple for a tuple, a dict for a dict).

    Raises:
        ValueError: ``v`` of another structure or shape, non-scalar ``f``, unknown strategy (the
            message lists the valid ones), ``"fwd-rev"`` on a function forward mode cannot run
            (as :func:`hessian`; ``"auto"`` falls back to ``"rev-rev"`` there).
        TypeError: ``v`` of another dtype, integer ``args``, ``f`` not callable.

    Example:
        >>> import gradlab as gl
        >>> x = torch.tensor([1.0, 2.0])
        >>> value, hv = gl.hvp(lambda x: (x**3).sum(), x, torch.tensor([1.0, 0.0]))
        >>> value.item(), hv
        (9.0, tensor([6., 0.]))
    """
    if strategy != "auto":
        HVP_OP.check(strategy)
    check_callable("hvp", "f", f, what="a callable (the function to differentiate)")
    prim, single = primals("hvp", args)
    if single:
        tangents = (v,)
        p_leaves, p_spec = flatten_one(args)
        t_leaves, t_spec = flatten_one(v)
    else:
        tangents = primals("hvp", v)[0]
        p_leaves, p_spec = flatten(prim)
        t_leaves, t_spec = flatten(tangents)
    if strategy == "auto":
        # run_auto, written out: the key (HvpProblem.key) from the leaves at hand, and on the
        # usual hit (double backward chosen) its implementation called directly.
        fkey = function_key(f)
        grad_on = torch.is_grad_enabled()
        key = ("hvp", fkey, p_spec, t_spec, _signatures(p_leaves + t_leaves), grad_on)
        entry = cached(key)
        chosen = None if entry is None else steady(entry)
        if chosen is not None and HVP_OP.direct.get(chosen) is _double_backward:
            value, res = _double_backward_leaves(f, p_leaves, p_spec, t_leaves)
            out = unflatten_one(res, p_spec) if single else tuple(unflatten(res, p_spec))
            return _new_tuple(HVP, (value, out))  # HVP(value, out), less a Python-level __new__
    problem = HvpProblem(f, prim, tangents, (p_leaves, p_spec, t_leaves, t_spec))
    validate = functools.partial(_validate, f, prim, tangents)
    if strategy == "auto":
        value, hv = run_keyed(HVP_OP, problem, validate, fkey, key, entry)
    else:
        value, hv = dispatch(HVP_OP, strategy, problem, validate)
    return HVP(value, hv[0] if single else tuple(hv))


def _validate(f: TensorFn, prim: tuple, tangents: tuple) -> None:
    """:func:`hvp`'s argument checks (skipped by "auto" on a cache hit: its key implies them)."""
    check_call("hvp", f, prim, tuple(range(len(prim))), None)
    check_like("hvp", "v", tangents, prim, "args")


def vjp(f: TensorFn, args: Any, v: Any) -> VJP:
    r"""Vector-Jacobian product :math:`v^\top J` of ``f`` at ``args``, and ``f``'s value.

    Computed with ``torch.func.vjp``. ``args`` as in :func:`hvp` (a tensor or dict is one
    argument, a tuple several); ``v`` is structured like ``f``'s output.

    Returns:
        ``VJP(value, vjp)``: ``value`` is ``f``'s output, ``vjp`` is structured like ``args``.

    Raises:
        ValueError, TypeError: ``v`` of another structure, shape or dtype than the output;
            integer ``args``.

    Example:
        >>> import gradlab as gl
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> gl.vjp(lambda x: W @ x, torch.ones(2), torch.tensor([1.0, 0.0, 0.0])).vjp
        tensor([1., 2.])
    """
    prim, single = primals("vjp", args)
    check_call("vjp", f, prim, tuple(range(len(prim))), None)
    res: Any = torch.func.vjp(f, *prim)
    value, vjp_fn = res
    check_like("vjp", "v", v, value, "f's output")
    cot = vjp_fn(v)
    return VJP(value, cot[0] if single else tuple(cot))


def jvp(f: TensorFn, args: Any, v: Any) -> JVP:
    r"""Jacobian-vector product :math:`J v` of ``f`` at ``args``, and ``f``'s value.

    Computed with forward-mode AD (``torch.func.jvp``). ``args`` as in :func:`hvp`; ``v`` is
    structured like ``args``.

    Returns:
        ``JVP(value, jvp)``: ``value`` is ``f``'s output, ``jvp`` is structured like it.

    Raises:
        ValueError, TypeError: ``v`` of another structure, shape or dtype than ``args``.

    Example:
        >>> import gradlab as gl
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> gl.jvp(lambda x: W @ x, torch.ones(2), torch.tensor([1.0, 0.0])).jvp
        tensor([1., 3., 5.])
    """
    prim, single = primals("jvp", args)
    tangents = (v,) if single else primals("jvp", v)[0]
    check_call("jvp", f, prim, tuple(range(len(prim))), None)
    check_like("jvp", "v", tangents, prim, "args")
    with FORWARD_AD_LOCK:  # forward-mode AD state is process-global in torch
        res: Any = torch.func.jvp(f, prim, tangents)
    value, out = res
    return JVP(value, out)
