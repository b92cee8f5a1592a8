"""The core every penalty is built on: per-sample L2 norms of input gradients, zero-safe."""

from __future__ import annotations

import torch

from gradlab._errors import GraphError
from gradlab._typing import TensorOrTensors
from gradlab.penalties._checks import (
    as_tensors,
    check_outputs,
    check_requires_grad,
    check_scaler,
)

__all__ = [
    "grad_error",
    "input_gradient_norms",
    "input_gradients",
    "sample_norms",
    "sample_sq_norms",
]


def input_gradients(
    fn: str,
    outputs: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    *,
    create_graph: bool,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``outputs.sum()`` w.r.t. each input (unscaled if a scaler is given).

    With a scaler this is PyTorch's AMP gradient-penalty recipe: differentiate the scaled outputs
    (so small float16 gradients do not underflow), then unscale out of place.
    """
    if scaler is not None:
        outputs = scaler.scale(outputs)
    try:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=torch.ones_like(outputs),
            create_graph=create_graph,
        )
    except RuntimeError as e:
        raise grad_error(fn, e) from None
    if scaler is not None:
        inv_scale = 1.0 / scaler.get_scale()
        grads = tuple(g * inv_scale for g in grads)
    return grads


def grad_error(fn: str, e: RuntimeError) -> Exception:
    """What to raise for ``torch.autograd.grad``'s error ``e``: a GraphError with the fix when the
    outputs do not depend on an input, ``e`` itself otherwise."""
    if "not have been used in the graph" in str(e) or "does not require grad" in str(e):
        return GraphError(
            f"{fn}: the critic's output does not depend on (one of) its inputs ({e}). Fix: "
            "the inputs must be the tensors the output was computed from; a critic that "
            "ignores an input has no gradient with respect to it"
        )
    return e


def _sample_dims(g: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, g.ndim))


def sample_norms(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-sample L2 norm over every non-batch dimension of every gradient; zero-safe.

    ``torch.linalg.vector_norm``'s backward masks the division by the norm where the norm is 0, so
    the derivative is the (sub)gradient 0 there instead of ``0 * inf = NaN``.
    """
    per_input = [
        torch.linalg.vector_norm(g, dim=_sample_dims(g)) if g.ndim > 1 else g.abs() for g in grads
    ]
    if len(per_input) == 1:
        return per_input[0]
    return torch.linalg.vector_norm(torch.stack(per_input), dim=0)


def sample_sq_norms(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-sample squared L2 norm (a plain sum of squares: smooth everywhere, no square root)."""
    total = None
    for g in grads:
        sq = g.square().sum(dim=_sample_dims(g)) if g.ndim > 1 else g.square()
        total = sq if total is None else total + sq
    assert total is not None
    return total


def input_gradient_norms(
    outputs: torch.Tensor,
    inputs: TensorOrTensors,
    *,
    create_graph: bool = True,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    r"""Per-sample L2 norms of the gradient of a critic's outputs with respect to its inputs.

    For a batch of samples :math:`x_i` (one or several tensors per sample) and outputs
    :math:`D(x)_i`,

    .. math::

        n_i = \Big\| \nabla_{x_i} \textstyle\sum_j D(x)_{ij} \Big\|_2
            = \sqrt{\textstyle\sum_k \sum_{d} \big(\partial_{x^{(k)}_{i,d}}
              \sum_j D(x)_{ij}\big)^2},

    the norm running over **every** non-batch dimension ``d`` of every input ``k`` (for a tuple of
    inputs it is the norm of the concatenated gradient, i.e. the per-input squared norms are
    summed). Several outputs per sample (a PatchGAN map) are summed per sample. Samples must not
    interact in the critic (no BatchNorm in training mode) for :math:`n_i` to depend on sample
    :math:`i` alone.

    The norm is zero-safe: where a sample's gradient is exactly zero, differentiating a penalty of
    :math:`n_i` gives finite (zero) gradients, not the NaN of ``sqrt(sum(g**2))``. The gradient is
    taken with :func:`torch.autograd.grad`, so no ``.grad`` attribute is touched.

    Args:
        outputs: critic outputs of shape ``(B,)`` or ``(B, ...)``, computed from ``inputs``.
        inputs: the tensor or tuple of tensors (batch first, ``requires_grad=True``) that
            ``outputs`` was computed from.
        create_graph: keep the graph of the gradient so the norms can be differentiated (what a
            penalty needs). With ``False`` the norms are detached, for logging.
        scaler: a :class:`torch.amp.GradScaler`: differentiate ``scaler.scale(outputs)`` and
            unscale the gradients out of place (PyTorch's AMP gradient-penalty recipe). Call this
            inside the same ``torch.autocast`` region as the forward pass.

    Returns:
        The norms, shape ``(B,)``, in the gradients' dtype.

    Raises:
        ValueError: ``outputs`` without the batch dimension, or inputs that do not require grad.
        GraphError: ``outputs`` that do not depend on ``inputs``.

    Example:
        >>> from gradlab.penalties import input_gradient_norms
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> x = torch.randn(5, 2, requires_grad=True)
        >>> input_gradient_norms(x @ w, x)  # a linear critic: ||w|| = 5 for every sample
        tensor([5., 5., 5., 5., 5.], grad_fn=<LinalgVectorNormBackward0>)
    """
    fn = "input_gradient_norms"
    xs = as_tensors(fn, "inputs", inputs)
    check_requires_grad(fn, "inputs", xs)
    check_outputs(fn, outputs, xs[0].shape[0], arg="outputs")
    grads = input_gradients(
        fn, outputs, xs, create_graph=create_graph, scaler=check_scaler(fn, scaler)
    )
    norms = sample_norms(grads)
    return norms if create_graph else norms.detach()
