"""The one Hessian-vector-product engine: double backward through a shared first-order graph.

``gl.hvp(strategy="double-backward")`` and every curvature function use :class:`GradGraph`: the
gradient of a scalar w.r.t. its inputs is taken once with ``create_graph=True``, then each product
``H v`` is one ``autograd.grad(g, inputs, v)`` through that graph (what a hand-written
PyHessian-style loop does), with nothing else per product: no dtype conversion, no flattening or
concatenation, no probe. Callers that need flat vectors (the curvature operator) do that
themselves, once per product; batching (``batched=True``) is the caller's decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch
from torch.overrides import has_torch_function

__all__ = ["GradGraph", "engine_grad", "hvp_once"]

# The function through which torch.autograd.grad runs the engine (private to torch, hence looked
# up: without it, engine_grad() below calls torch.autograd.grad).
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)
_ones_like = torch.ones_like
_same_size = torch.is_same_size
_preserve = torch.preserve_format


def engine_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor] | None,
    retain_graph: bool,
    create_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
    create_graph=create_graph, allow_unused=True)``, less the Python work it does before it runs
    the engine.

    That work (normalising the arguments; per output, two imports and a symbolic-shape
    comparison of the output with its grad_output) costs more than the rest of an ``hvp`` call's
    own overhead, twice per product. Here the same engine call (the same function
    ``torch.autograd.grad`` ends in) runs after only the checks these arguments need: no
    ``__torch_function__`` override among the outputs and inputs (as ``torch.autograd.grad``
    asks), each grad_output of its output's size (the engine alone would reduce a broadcastable
    one silently where ``torch.autograd.grad`` raises), and, for ``grad_outputs=None``,
    single-element outputs, whose grad_output is then ones (as ``torch.autograd.grad`` makes).
    Anything else is passed to ``torch.autograd.grad``, which raises its own error.
    """
    outs = tuple(outputs)
    ins = tuple(inputs)
    if _RUN_BACKWARD is not None and not has_torch_function(outs + ins):
        if grad_outputs is None:
            gos = []
            for o in outs:
                if o.numel() != 1:
                    break
                gos.append(_ones_like(o, memory_format=_preserve))
            else:
                return _RUN_BACKWARD(
                    outs, tuple(gos), retain_graph, create_graph, ins, True, accumulate_grad=False
                )
        else:
            given = tuple(grad_outputs)
            if len(given) == len(outs):
                for o, g in zip(outs, given):
                    if not _same_size(o, g):
                        break
                else:
                    return _RUN_BACKWARD(
                        outs, given, retain_graph, create_graph, ins, True, accumulate_grad=False
                    )
    return torch.autograd.grad(
        outs,
        ins,
        grad_outputs,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )


def _grad_on() -> contextlib.AbstractContextManager:
    """Grad mode on for a block: a no-op when it is on already (the usual case; entering
    ``torch.enable_grad()`` costs microseconds on every product)."""
    return contextlib.nullcontext() if torch.is_grad_enabled() else torch.enable_grad()


class GradGraph:
    """First-order gradient graph of a scalar ``value`` w.r.t. ``inputs``, for many HVPs.

    Attributes:
        inputs: the tensors differentiated against.
        used: indices of the inputs whose gradient depends on them again (a second derivative
            exists); the others have a zero Hessian row/column block or are unused.
        unused: indices of the inputs ``value`` does not depend on at all.
        grads: the first-order gradients of the ``used`` inputs (with a graph).
    """

    def __init__(
        self,
        value: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        *,
        grads: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """``grads``: the first-order gradients when the caller took them already (with
        ``create_graph=True`` and ``allow_unused=True``, as here)."""
        self.inputs = list(inputs)
        if grads is None:
            with _grad_on():
                grads = engine_grad((value,), self.inputs, None, True, True)
        gs = grads
        self.first = list(gs)
        self.unused: list[int] = []
        self.used: list[int] = []
        for i, g in enumerate(gs):
            if g is None:
                self.unused.append(i)
            elif g.requires_grad:
                self.used.append(i)
        self._all_used = len(self.used) == len(self.inputs)
        if self._all_used:
            self.grads = self.first
            self._used_inputs = self.inputs
        else:
            self.grads = [gs[i] for i in self.used]
            self._used_inputs = [self.inputs[i] for i in self.used]

    def hvp(
        self,
        vs: Sequence[torch.Tensor],
        *,
        retain_graph: bool = True,
        create_graph: bool = False,
        batched: bool = False,
    ) -> list[torch.Tensor]:
        """``H v`` for ``vs`` shaped like ``inputs`` (one piece per input).

        With ``batched=True`` each piece has a leading batch dimension and the products are
        computed in one vmapped backward (``is_grads_batched``). Inputs without a second-order
        path get zeros.
        """
        if self._all_used:  # the usual case: no index mapping
            with _grad_on():
                hv = self._grad(self.grads, self.inputs, vs, retain_graph, create_graph, batched)
            return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs)]
        out: list[torch.Tensor | None] = [None] * len(self.inputs)
        if self.used:
            with _grad_on():
                hv = self._grad(
                    self.grads,
                    self._used_inputs,
                    [vs[i] for i in self.used],
                    retain_graph,
                    create_graph,
                    batched,
                )
            for i, h in zip(self.used, hv):
                out[i] = h
        return [torch.zeros_like(v) if h is None else h for h, v in zip(out, vs)]

    @staticmethod
    def _grad(
        gs: Sequence[torch.Tensor | None],
        inputs: Sequence[torch.Tensor],
        vs: Sequence[torch.Tensor],
        retain_graph: bool,
        create_graph: bool,
        batched: bool,
    ) -> Sequence[torch.Tensor | None]:
        """One backward through the first-order graph: :func:`engine_grad`, or, batched,
        ``torch.autograd.grad(is_grads_batched=True)``."""
        outs = cast(Sequence[torch.Tensor], gs)  # (the used inputs' gradients: none is None)
        if not batched:
            return engine_grad(outs, inputs, vs, retain_graph or create_graph, create_graph)
        return torch.autograd.grad(
            outs,
            inputs,
            grad_outputs=list(vs),
            retain_graph=retain_graph or create_graph,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=True,
        )


def hvp_once(
    value: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    *,
    create_graph: bool,
    grads: Sequence[torch.Tensor | None] | None = None,
) -> Sequence[torch.Tensor]:
    """One product: ``GradGraph(value, inputs).hvp(vs, retain_graph=False, create_graph=...)``.

    What :func:`gradlab.hvp` runs on every call, so the usual case (every input has a second
    derivative) is the two backward passes of a hand-written double backward (through
    :func:`engine_grad`) and nothing else: no object, no index lists. Call with grad mode on;
    ``grads``: the first-order gradients, when the caller took them already (with
    ``create_graph=True`` and ``allow_unused=True``). Anything else goes through
    :class:`GradGraph`, which maps the inputs without a second-order path to zeros.
    """
    gs = engine_grad((value,), inputs, None, True, True) if grads is None else grads
    for g in gs:
        if g is None or not g.requires_grad:
            break
    else:
        hv = engine_grad(
            cast(Sequence[torch.Tensor], gs),  # (none is None: checked above)
            inputs,
            vs,
            create_graph,
            create_graph,
        )
        for h in hv:
            if h is None:  # an input the gradients do not depend on: a zero block
                return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs)]
        return cast(Sequence[torch.Tensor], hv)  # (none is None: checked above)
    graph = GradGraph(value, inputs, grads=gs)
    return graph.hvp(vs, retain_graph=False, create_graph=create_graph)
