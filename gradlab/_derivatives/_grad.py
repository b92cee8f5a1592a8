"""First derivatives of a graph that is already built: :func:`grad` and :func:`backward`.

Both compute ``sum_j grad_outputs[j]^T d outputs[j] / d inputs[i]`` for every input ``i``; they
differ only in the autograd entry point (``torch.autograd.grad`` versus
``Tensor.backward(inputs=...)``) and give the same result. ``backward`` hands every ``.grad`` it
touched back its previous value, so it never accumulates into the caller's gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch.autograd.graph import get_gradient_edge

from gradlab._errors import GraphError
from gradlab._typing import TensorOrTensors
from gradlab._validate import check_choice, message

__all__ = ["backward", "grad"]

Unused = Literal["zeros", "none", "error"]
_UNUSED = ("zeros", "none", "error")


def _as_tuple(
    name: str, fn: str, value: TensorOrTensors, *, allow_none: bool = False
) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor) and not (allow_none and t is None):
                raise TypeError(message(fn, f"{name}[{i}]", "a torch.Tensor", t, _TENSORS))
        return items
    raise TypeError(message(fn, name, "a torch.Tensor or a sequence of tensors", value, _TENSORS))


_TENSORS = "Pass a tensor or a sequence (list, tuple) of tensors"


def _prepare(
    fn: str,
    outputs: TensorOrTensors,
    inputs: TensorOrTensors,
    grad_outputs: TensorOrTensors | None,
    unused: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Validate the arguments; return (outputs, grad_outputs) that require grad, and inputs."""
    if unused not in _UNUSED:
        check_choice(fn, "unused", unused, _UNUSED)
    outs = _as_tuple("outputs", fn, outputs)
    ins = _as_tuple("inputs", fn, inputs)
    if not ins:
        raise ValueError(
            message(
                fn, "inputs", "at least one tensor", inputs, "Pass the tensors to differentiate by"
            )
        )
    for i, t in enumerate(ins):
        if not t.requires_grad:
            raise ValueError(
                message(
                    fn,
                    f"inputs[{i}]",
                    "a tensor that requires grad",
                    t,
                    "Call .requires_grad_() on it before computing outputs",
                )
            )
    if grad_outputs is None:
        gos: tuple[torch.Tensor | None, ...] = (None,) * len(outs)
    else:
        gos = _as_tuple("grad_outputs", fn, grad_outputs, allow_none=True)
        if len(gos) != len(outs):
            raise ValueError(
                message(
                    fn,
                    "grad_outputs",
                    f"{len(outs)} entries, one per output",
                    f"{len(gos)} entries",
                    "Pass one weight tensor per output",
                )
            )
    used_outs: list[torch.Tensor] = []
    used_gos: list[torch.Tensor] = []
    for j, (o, g) in enumerate(zip(outs, gos)):
        if g is None:
            if o.numel() != 1:
                raise ValueError(
                    message(
                        fn,
                        f"outputs[{j}]",
                        "a scalar when grad_outputs is not given",
                        o,
                        "Pass grad_outputs (e.g. torch.ones_like(output)) for non-scalar outputs",
                    )
                )
            g = torch.ones_like(o)
        elif g.shape != o.shape:
            raise ValueError(
                message(
                    fn,
                    f"grad_outputs[{j}]",
                    f"of shape {tuple(o.shape)} like outputs[{j}]",
                    g,
                    "They must match",
                )
            )
        elif g.dtype != o.dtype and not (g.is_floating_point() and o.is_floating_point()):
            raise TypeError(
                message(
                    fn,
                    f"grad_outputs[{j}]",
                    f"of dtype {o.dtype} like outputs[{j}]",
                    g,
                    "Pass a floating-point weight of the output's dtype",
                )
            )
        if o.requires_grad:
            used_outs.append(o)
            used_gos.append(g)
    if not used_outs:
        raise GraphError(
            f"{fn}: no element of outputs requires grad (was it computed under torch.no_grad(), "
            f"or from inputs without requires_grad?); compute outputs with grad enabled"
        )
    return used_outs, used_gos, ins


def _finish(
    fn: str,
    grads: Sequence[torch.Tensor | None],
    ins: tuple[torch.Tensor, ...],
    unused: str,
    single: bool,
) -> torch.Tensor | tuple[torch.Tensor | None, ...] | None:
    result: list[torch.Tensor | None] = []
    for i, (g, t) in enumerate(zip(grads, ins)):
        if g is None:
            if unused == "error":
                raise GraphError(
                    f"{fn}: inputs[{i}] (shape {tuple(t.shape)}) is not used to compute outputs; "
                    f'remove it from inputs or pass unused="zeros"'
                )
            if unused == "zeros":
                g = torch.zeros_like(t)
        result.append(g)
    return result[0] if single else tuple(result)


def _capture(store: dict[int, torch.Tensor], key: int):  # type: ignore[no-untyped-def]
    def hook(g: torch.Tensor) -> None:
        store[key] = g

    return hook


def _scalar_grad(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    retain_graph: bool | None,
    create_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad`` of one scalar output (implicit weight 1), grad mode on."""
    if torch.is_grad_enabled():
        return torch.autograd.grad(
            output, inputs, None, retain_graph, create_graph, allow_unused=True
        )
    with torch.enable_grad():
        return torch.autograd.grad(
            output, inputs, None, retain_graph, create_graph, allow_unused=True
        )


def grad(
    outputs: TensorOrTensors,
    inputs: TensorOrTensors,
    *,
    grad_outputs: TensorOrTensors | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    unused: Unused = "zeros",
) -> torch.Tensor | tuple[torch.Tensor | None, ...] | None:
    r"""Gradient of ``outputs`` with respect to ``inputs`` through ``torch.autograd.grad``.

    Computes, for every input :math:`x_i`,

    .. math:: g_i = \sum_j \Big(\frac{\partial y_j}{\partial x_i}\Big)^{\top} w_j,

    where :math:`y_j` are the outputs and :math:`w_j` the ``grad_outputs`` (``1`` for a scalar
    output). Outputs that do not require grad contribute zero.

    Args:
        outputs: a tensor or a sequence of tensors computed from ``inputs``.
        inputs: a tensor or a sequence of tensors that require grad.
        grad_outputs: one weight per output, same shape; may be omitted (or ``None`` entries)
            only for outputs with one element.
        create_graph: build the graph of the derivative, so it can be differentiated again. The
            result has ``grad_fn is None`` unless this is set.
        retain_graph: keep the graph of ``outputs`` for another backward pass (default:
            ``create_graph``).
        unused: what an input that ``outputs`` do not depend on gets: ``"zeros"`` (a zero tensor
            of its shape), ``"none"`` (``None``) or ``"error"`` (a :class:`gradlab.GraphError`
            naming the input).

    Returns:
        A tensor if ``inputs`` is a tensor, else a tuple in the order of ``inputs``.

    Raises:
        ValueError: an input that does not require grad, a non-scalar output without
            ``grad_outputs``, ``grad_outputs`` of the wrong shape or count, an unknown ``unused``.
        TypeError: something other than tensors passed.
        GraphError: no output requires grad, or an unused input with ``unused="error"``.

    Works under ``torch.no_grad()`` (the graph of ``outputs`` must exist; grad mode is enabled
    internally for ``create_graph``).

    Example:
        >>> import gradlab as gl
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gl.grad((x**3).sum(), x)
        tensor([ 3., 12.])
        >>> z = torch.ones(2, requires_grad=True)
        >>> gx, gz = gl.grad((x**2).sum(), [x, z])
        >>> gz
        tensor([0., 0.])
    """
    if (
        isinstance(outputs, torch.Tensor)
        and grad_outputs is None
        and unused == "zeros"
        and outputs.requires_grad
        and outputs.numel() == 1
        and outputs.is_floating_point()
    ):
        # The common call, checked in a few attribute reads: one scalar output, one input or a
        # list/tuple of inputs that all require grad (else the general path names the bad one).
        # torch.autograd.grad creates the implicit weight 1 itself; grad mode is switched on only
        # when it is off (the context manager costs a few microseconds a call).
        if isinstance(inputs, torch.Tensor):
            if inputs.requires_grad:
                (g,) = _scalar_grad(outputs, (inputs,), retain_graph, create_graph)
                return torch.zeros_like(inputs) if g is None else g
        elif type(inputs) in (list, tuple) and inputs:
            for t in inputs:
                if not isinstance(t, torch.Tensor) or not t.requires_grad:
                    break
            else:
                gs = _scalar_grad(outputs, inputs, retain_graph, create_graph)
                return tuple([torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)])
    outs, gos, ins = _prepare("grad", outputs, inputs, grad_outputs, unused)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            outs,
            ins,
            grad_outputs=gos,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
    return _finish("grad", grads, ins, unused, isinstance(inputs, torch.Tensor))


def backward(
    outputs: TensorOrTensors,
    inputs: TensorOrTensors,
    *,
    grad_outputs: TensorOrTensors | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    unused: Unused = "zeros",
) -> torch.Tensor | tuple[torch.Tensor | None, ...] | None:
    r"""The same result as :func:`grad`, computed through ``Tensor.backward(inputs=...)``.

    The tutorials' other way of computing a gradient. gradlab sets every input's ``.grad`` to
    ``None``, runs ``torch.autograd.backward(outputs, grad_outputs, inputs=inputs)``, reads the
    accumulated ``.grad`` and then gives every ``.grad`` back the object it held before (``None``
    included), so the caller's gradients never accumulate by accident. Non-leaf inputs are passed
    to ``backward`` as their gradient edges and read with a temporary tensor hook (removed
    afterwards), because ``inputs=[non_leaf]`` would switch ``retains_grad`` on for good; no trace
    is left. User hooks on the inputs fire, as they would for ``Tensor.backward``.

    Args:
        outputs: a tensor or a sequence of tensors computed from ``inputs``.
        inputs: a tensor or a sequence of tensors that require grad (leaves or not).
        grad_outputs: one weight per output, as in :func:`grad`.
        create_graph: build the graph of the derivative (``grad_fn is None`` unless set).
        retain_graph: keep the graph of ``outputs`` (default: ``create_graph``).
        unused: ``"zeros"``, ``"none"`` or ``"error"``, as in :func:`grad`.

    Returns:
        A tensor if ``inputs`` is a tensor, else a tuple in the order of ``inputs``.

    Raises:
        ValueError, TypeError, GraphError: as :func:`grad`.

    Example:
        >>> import gradlab as gl
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> x.grad = torch.tensor([5.0, 5.0])
        >>> gl.backward((x**2).sum(), x)
        tensor([2., 4.])
        >>> x.grad
        tensor([5., 5.])
    """
    outs, gos, ins = _prepare("backward", outputs, inputs, grad_outputs, unused)
    unique: dict[int, torch.Tensor] = {}
    for t in ins:
        unique.setdefault(id(t), t)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    targets: list = []
    for k, t in unique.items():
        if t.is_leaf:
            targets.append(t)
        else:
            # A non-leaf passed as inputs= would be switched to retains_grad for good, so it is
            # given as its gradient edge and its gradient is read by a temporary tensor hook.
            targets.append(get_gradient_edge(t))
            handles.append(t.register_hook(_capture(captured, k)))
    with warnings.catch_warnings():
        # Reading .grad of a non-leaf warns; we only save and restore it.
        warnings.simplefilter("ignore", UserWarning)
        saved = {k: t.grad for k, t in unique.items()}
        try:
            for t in unique.values():
                t.grad = None
            with torch.enable_grad():
                torch.autograd.backward(
                    outs,
                    grad_tensors=gos,
                    retain_graph=retain_graph,
                    create_graph=create_graph,
                    inputs=targets,
                )
            got = {k: (t.grad if t.is_leaf else captured.get(k)) for k, t in unique.items()}
        finally:
            for handle in handles:
                handle.remove()
            for k, t in unique.items():
                t.grad = saved[k]
    grads = [got[id(t)] for t in ins]
    return _finish("backward", grads, ins, unused, isinstance(inputs, torch.Tensor))
