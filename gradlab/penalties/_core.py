"""The one core of every exact penalty: input gradients, per-sample norms, the reduction.

Every exact penalty (WGAN-GP/LP, zero-centred GP, R1, R2, DRAGAN) is described by a small frozen
:class:`PenaltySpec` and computed by :func:`exact_penalty` (the critic called on leaves) or
:func:`penalty_of_outputs` (outputs the caller already has). There is one path, written for the
common case (one input tensor, no scaler) with as few Python calls and tensor operations as the
best hand-written step; tuples of inputs and a scaler go through the same lines. Path length and
:func:`~gradlab.penalties.input_gradient_norms` share :func:`input_gradients` and
:func:`per_sample_norms`, so per-sample norms are computed one way everywhere.

Adding an exact penalty is a new front-end module that validates its arguments, builds its
leaves and a :class:`PenaltySpec` (:func:`make_spec`), and calls :func:`exact_penalty`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from gradlab._errors import GraphError
from gradlab.penalties._checks import check_outputs, is_ddp

__all__ = [
    "PenaltySpec",
    "PenaltyWithNorms",
    "exact_penalty",
    "grad_error",
    "input_gradients",
    "make_spec",
    "norm_penalty",
    "penalty_of_outputs",
    "per_sample_norms",
    "zero_grad_to",
]

_DOT_DTYPES = (torch.float32, torch.float64)
# The non-batch dimensions of a tensor with n dimensions (n <= 8 precomputed: the common case).
_SAMPLE_DIMS = tuple(tuple(range(1, n)) for n in range(9))


class PenaltyWithNorms(NamedTuple):
    """What the ``*_and_norms`` penalty functions return.

    Each penalty ``p`` returns a scalar; its twin ``p_and_norms`` (same arguments) returns this
    pair. Twins rather than a ``return_norms=True`` flag, because the API contract asks for one
    return structure per call signature (STYLE.md #4): a flag would make the result a tensor or
    a pair depending on a value, which a type checker cannot follow and every caller must keep
    in mind; a second name returns one structure always. Both are one call of the same core and
    the norms cost nothing extra.

    Attributes:
        penalty: the scalar penalty to add to the loss (differentiable w.r.t. the critic).
        norms: the per-sample input-gradient norms the penalty was computed from, shape ``(B,)``,
            detached: log them (mean, max, fraction near the target) at no extra cost. (For
            ``method="finite-difference"`` they are the per-sample estimates
            :math:`|D(x_i + \\sigma\\epsilon_i) - D(x_i)|/\\sigma`, whose squares estimate the
            squared norms with a bias of order :math:`\\sigma^2`.)

    Example:
        >>> from gradlab.penalties import gradient_penalty_and_norms
        >>> critic = torch.nn.Linear(3, 1)  # a linear critic: every input gradient is its weight
        >>> gp, norms = gradient_penalty_and_norms(critic, torch.randn(8, 3), torch.randn(8, 3))
        >>> tuple(norms.shape), torch.allclose(norms, critic.weight.norm().expand(8))
        ((8,), True)
    """

    penalty: torch.Tensor
    norms: torch.Tensor


@dataclass(frozen=True, slots=True)
class PenaltySpec:
    """What a penalty computes from the per-sample input-gradient norms :math:`n_i`.

    ``squared=False``: ``weight * mean_i (n_i - center)^2`` (``max(0, n_i - center)^2`` if
    ``one_sided``). ``squared=True``: ``weight * mean_i n_i^2``, from the squared norms directly
    (a plain sum of squares, smooth everywhere: R1/R2 with ``weight = gamma / 2``).

    Attributes:
        fn: the public function's name, for messages.
        weight: the factor in front of the mean.
        center: the target norm (``squared=False`` only).
        one_sided: penalise only norms above ``center``.
        squared: reduce the squared norms (R1/R2) instead of the norms.
    """

    fn: str
    weight: float
    center: float = 0.0
    one_sided: bool = False
    squared: bool = False


_SPECS: dict[tuple[str, float, float, bool, bool], PenaltySpec] = {}


def make_spec(
    fn: str, weight: float, center: float = 0.0, one_sided: bool = False, squared: bool = False
) -> PenaltySpec:
    """The :class:`PenaltySpec` of these values, made once and kept (specs are immutable): a
    penalty call costs a dict lookup instead of a frozen dataclass's construction. (A plain dict:
    its get and set are atomic, and two threads racing make equal specs. At most 1024 are kept.)
    """
    key = (fn, weight, center, one_sided, squared)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= 1024:
            _SPECS.clear()
        spec = _SPECS[key] = PenaltySpec(fn, weight, center, one_sided, squared)
    return spec


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
            outputs, inputs, torch.ones_like(outputs), create_graph=create_graph
        )
    except RuntimeError as e:
        raise grad_error(fn, e) from None
    if scaler is not None:
        inv_scale = 1.0 / scaler.get_scale()
        grads = tuple(g * inv_scale for g in grads)
    return grads


def per_sample_norms(grads: tuple[torch.Tensor, ...], *, squared: bool = False) -> torch.Tensor:
    """Per-sample L2 norm (``squared``: squared norm) over every non-batch dimension of every
    gradient, shape ``(B,)``.

    The norm is zero-safe: ``torch.linalg.vector_norm``'s backward masks the division by the norm
    where it is 0, so the derivative is the (sub)gradient 0 there instead of ``0 * inf = NaN``.
    The squared norm is a plain sum of squares (smooth everywhere, no square root).
    """
    if len(grads) == 1:
        g = grads[0]
        n = g.ndim
        if n == 1:
            return g.square() if squared else g.abs()
        dims = _SAMPLE_DIMS[n] if n < len(_SAMPLE_DIMS) else tuple(range(1, n))
        return g.square().sum(dim=dims) if squared else torch.linalg.vector_norm(g, dim=dims)
    sq = [per_sample_norms((g,), squared=True) for g in grads]
    if squared:
        return torch.stack(sq).sum(dim=0)
    norms = [torch.linalg.vector_norm(g, dim=_dims(g)) if g.ndim > 1 else g.abs() for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def _dims(g: torch.Tensor) -> tuple[int, ...]:
    n = g.ndim
    return _SAMPLE_DIMS[n] if n < len(_SAMPLE_DIMS) else tuple(range(1, n))


def norm_penalty(norms: torch.Tensor, spec: PenaltySpec) -> torch.Tensor:
    """The reduction of ``spec`` over the per-sample ``norms`` (squared norms if
    ``spec.squared``); see :class:`PenaltySpec`.

    For ``squared=False`` in float32/float64 this is ``dot(dev, dev) * (weight / B)``: one
    reduction kernel and one autograd node instead of ``square`` and ``mean`` (whose backward takes
    five kernels), which is most of the penalty's cost at small critics. Reduced precision keeps
    ``square().mean()``, whose reduction accumulates in float32.
    """
    if spec.squared:
        return norms.mean() * spec.weight
    dev = norms - spec.center if spec.center != 0.0 else norms
    if spec.one_sided:
        dev = torch.relu(dev)
    if dev.dtype in _DOT_DTYPES and dev.ndim == 1 and dev.shape[0] > 0:
        return torch.dot(dev, dev) * (spec.weight / dev.shape[0])
    return dev.square().mean() * spec.weight


class _ZeroGradToOutputs(torch.autograd.Function):
    """Identity on ``penalty`` whose backward also sends a zero gradient into ``outputs``.

    Equivalent to StyleGAN2-ADA's ``penalty + 0 * outputs`` but exact: the forward value stays the
    penalty even where an output is inf or NaN (``0 * inf`` would be NaN).
    """

    @staticmethod
    def forward(ctx: Any, penalty: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        ctx.spec = (outputs.shape, outputs.dtype, outputs.device)
        return penalty.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.spec
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def zero_grad_to(penalty: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``penalty``, whose backward also sends a zero gradient into ``outputs``.

    This makes every parameter of a DDP critic take part in a penalty-only backward. The
    penalty's gradient does not reach every parameter (the last layer's bias never affects an
    input gradient), so DDP waits forever for those parameters' gradients and the next iteration
    fails with "Expected to have finished reduction in the prior iteration". A zero gradient into
    the critic's outputs reaches every parameter the forward used, as StyleGAN2-ADA does.
    """
    out: torch.Tensor = _ZeroGradToOutputs.apply(penalty, outputs)
    return out


def penalty_of_outputs(
    spec: PenaltySpec,
    critic: Any,
    outputs: Any,
    inputs: tuple[torch.Tensor, ...],
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` (norms not detached) of the critic's ``outputs`` computed from
    ``inputs`` (grad mode enabled). ``critic`` is only looked at for DDP (see
    :func:`zero_grad_to`)."""
    batch = inputs[0].shape[0]
    if not (  # the checks of check_outputs, inline: each attribute read costs at small critics
        type(outputs) is torch.Tensor
        and outputs.requires_grad
        and outputs.ndim > 0
        and outputs.shape[0] == batch
        and outputs.is_floating_point()
    ):
        check_outputs(spec.fn, outputs, batch)  # raises the precise error
    if scaler is None:  # input_gradients without a scaler, inline (the hot path)
        try:
            grads = torch.autograd.grad(
                outputs, inputs, torch.ones_like(outputs), create_graph=True
            )
        except RuntimeError as e:
            raise grad_error(spec.fn, e) from None
    else:
        grads = input_gradients(spec.fn, outputs, inputs, create_graph=True, scaler=scaler)
    norms = per_sample_norms(grads, squared=spec.squared)
    penalty = norm_penalty(norms, spec)
    if is_ddp(critic):
        penalty = zero_grad_to(penalty, outputs)
    return penalty, norms


def exact_penalty(
    spec: PenaltySpec,
    critic: Any,
    leaves: tuple[torch.Tensor, ...],
    kwargs: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty, norms)`` (norms not detached) of the critic's input gradients at ``leaves``
    (fresh leaf tensors with ``requires_grad=True``); enables grad mode itself."""
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return exact_penalty(spec, critic, leaves, kwargs, scaler)
    outputs = critic(*leaves, **kwargs) if kwargs else critic(*leaves)
    return penalty_of_outputs(spec, critic, outputs, leaves, scaler)
