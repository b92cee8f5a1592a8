"""The public building block every penalty shares: per-sample input-gradient norms."""

from __future__ import annotations

import torch

from gradlab._typing import TensorOrTensors
from gradlab.penalties._checks import (
    as_tensors,
    check_outputs,
    check_requires_grad,
    check_scaler,
)
from gradlab.penalties._core import input_gradients, per_sample_norms

__all__ = ["input_gradient_norms"]


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
            inside the same ``torch.autocast`` region as the forward pass. With the default
            ``init_scale=2**16`` and float16 outputs, ``scaler.scale(outputs)`` overflows
            (float16 ends at 65504) as soon as a score reaches 1 in magnitude, so the first
            step(s) give inf norms and an inf penalty; that is expected: ``scaler.step`` skips
            the step and ``scaler.update`` lowers the scale, as for any overflow. To skip none,
            start lower, e.g. ``GradScaler("cuda", init_scale=2**10)``.

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
    norms = per_sample_norms(grads)
    return norms if create_graph else norms.detach()
