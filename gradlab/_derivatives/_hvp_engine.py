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

__all__ = ["GradGraph", "hvp_once"]


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
                grads = torch.autograd.grad(
                    value, self.inputs, create_graph=True, allow_unused=True
                )
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
                hv = torch.autograd.grad(
                    self.grads,  # type: ignore[arg-type]
                    self.inputs,
                    grad_outputs=list(vs),
                    retain_graph=retain_graph or create_graph,
                    create_graph=create_graph,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs)]
        out: list[torch.Tensor | None] = [None] * len(self.inputs)
        if self.used:
            with _grad_on():
                hv = torch.autograd.grad(
                    self.grads,  # type: ignore[arg-type]
                    self._used_inputs,
                    grad_outputs=[vs[i] for i in self.used],
                    retain_graph=retain_graph or create_graph,
                    create_graph=create_graph,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            for i, h in zip(self.used, hv):
                out[i] = h
        return [torch.zeros_like(v) if h is None else h for h, v in zip(out, vs)]


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
    derivative) is the two ``autograd.grad`` calls of a hand-written double backward and nothing
    else: no object, no index lists. Call with grad mode on; ``grads``: the first-order
    gradients, when the caller took them already (with ``create_graph=True`` and
    ``allow_unused=True``). Anything else goes through :class:`GradGraph`, which maps the inputs
    without a second-order path to zeros.
    """
    gs = (
        torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
        if grads is None
        else grads
    )
    for g in gs:
        if g is None or not g.requires_grad:
            break
    else:
        hv = torch.autograd.grad(
            cast(Sequence[torch.Tensor], gs),  # (none is None: checked above)
            inputs,
            vs,
            retain_graph=create_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
        for h in hv:
            if h is None:  # an input the gradients do not depend on: a zero block
                return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs)]
        return hv
    graph = GradGraph(value, inputs, grads=gs)
    return graph.hvp(vs, retain_graph=False, create_graph=create_graph)
