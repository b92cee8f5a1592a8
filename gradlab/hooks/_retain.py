"""retain_grads: gradients of any tensors, ``retain_grad``-style, without touching ``.grad``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any, overload

import torch

from gradlab._validate import message
from gradlab.hooks._engine import HookContext

__all__ = ["RetainedGrads", "retain_grads"]


class RetainedGrads(HookContext, Sequence["torch.Tensor | None"]):
    """Gradients of the tensors given to :func:`retain_grads`, in the order they were given.

    ``grads[i]`` is the gradient accumulated into the i-th tensor so far (exactly what
    ``tensors[i].grad`` would hold after ``tensors[i].retain_grad()``), or ``None`` while no
    backward pass has reached it, as ``.grad`` would be.

    Example:
        >>> from gradlab.hooks import retain_grads
        >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y, unused = 3 * a, 2 * a
        >>> with retain_grads(y, unused) as grads:
        ...     y.sum().backward()
        >>> grads[0].tolist(), grads[1], len(grads)
        ([1.0, 1.0], None, 2)
    """

    _name = "retain_grads"

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self._tensors: list[torch.Tensor] | None = list(tensors)
        self._grads: list[torch.Tensor | None] = [None] * len(tensors)

    def _check_enter(self) -> None:
        if self._tensors is None:
            raise RuntimeError("retain_grads: this context was already used; create a new one")

    def _install(self) -> None:
        assert self._tensors is not None  # _check_enter
        ref = weakref.ref(self)
        try:
            for i, t in enumerate(self._tensors):
                self._bag.tensor(t.register_hook(_hook(ref, i)))
        finally:
            self._tensors = None  # the context does not keep the caller's tensors alive

    def _add(self, i: int, grad: torch.Tensor) -> None:
        g = grad.detach() if grad.requires_grad else grad
        old = self._grads[i]
        # Like the engine's retain_grad hook: copy the first gradient (it may be stolen and
        # updated in place elsewhere), add out of place afterwards.
        self._grads[i] = g.clone() if old is None else old + g

    @overload
    def __getitem__(self, i: int) -> torch.Tensor | None: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[torch.Tensor | None]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return tuple(self._grads[i])
        return self._grads[i]

    def __len__(self) -> int:
        return len(self._grads)

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter(tuple(self._grads))

    def __repr__(self) -> str:
        items = ["None" if g is None else f"Tensor{tuple(g.shape)}" for g in self._grads[:8]]
        if len(self._grads) > 8:
            items.append(f"... {len(self._grads) - 8} more")
        return f"RetainedGrads([{', '.join(items)}])"


def _hook(ref: weakref.ref[RetainedGrads], i: int) -> Any:
    def hook(grad: torch.Tensor) -> None:
        store = ref()
        if store is not None:
            store._add(i, grad)

    return hook


def retain_grads(*tensors: torch.Tensor) -> RetainedGrads:
    r"""Record the gradients of arbitrary tensors (non-leaf or leaf) during backward.

    The drop-in for ``y.retain_grad()`` that leaves ``y.grad`` alone: inside the context every
    backward pass that reaches ``tensors[i]`` adds :math:`\partial L / \partial y_i` to
    ``grads[i]``, accumulating over passes exactly as ``.grad`` does (clear by leaving the
    context and entering a new one). Differences from ``retain_grad``: nothing is set on the
    tensors, the hooks are removed on exit (exceptions included), and stored gradients are
    detached, so ``create_graph=True`` does not keep the graph alive through them. The context
    keeps no reference to the tensors.

    Args:
        *tensors: one or more tensors that require grad.

    Returns:
        A :class:`RetainedGrads` sequence, one entry per tensor (``None`` until reached).

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: no tensor was given, or a tensor does not require grad.

    Example:
        >>> from gradlab.hooks import retain_grads
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> y1 = x**2
        >>> y2 = -x**2
        >>> with retain_grads(y1, y2) as grads:
        ...     (y1 * y2).backward()
        >>> grads[0].item(), grads[1].item(), y1.retains_grad
        (-4.0, 4.0, False)
    """
    if not tensors:
        raise ValueError(
            "retain_grads: tensors is empty; pass the tensors whose gradients you want, "
            "e.g. retain_grads(y1, y2)"
        )
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                message(
                    "retain_grads",
                    f"argument {i}",
                    "a torch.Tensor",
                    t,
                    "Pass tensors, e.g. retain_grads(y1, y2)",
                )
            )
        if not t.requires_grad:
            raise ValueError(
                f"retain_grads: argument {i} (shape {tuple(t.shape)}) does not require grad, so no "
                "gradient can reach it; pass a tensor computed from inputs that require grad, or "
                "call .requires_grad_() on a leaf"
            )
    return RetainedGrads(tuple(tensors))
