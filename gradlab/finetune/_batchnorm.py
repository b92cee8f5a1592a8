"""Frozen BatchNorm: eval-pinned layers and the FrozenBatchNorm modules.

A BatchNorm layer in train mode normalises with batch statistics and updates its running
statistics, whether or not its affine parameters require grad, so ``requires_grad=False`` does not
freeze it (pytorch/pytorch#9046). Two ways to really freeze one:

- **eval-pinned** (``batchnorm="eval"``): the layer's ``train`` method is replaced, on that
  instance only, by one that records the requested mode and keeps the layer in eval mode, so a
  later ``model.train()`` leaves it in eval mode; a forward pre-hook puts it back in eval mode if
  code sets ``.training = True`` directly. Unpinning removes both and restores the mode the last
  ``train()``/``eval()`` call asked for, leaving no trace.
- **swapped** (``batchnorm="frozen"``): the layer is replaced in its parent(s) by a
  :class:`FrozenBatchNorm` (1d/2d/3d like the original) that holds the same tensors as buffers and
  computes exactly what the layer computes in eval mode (the same ``F.batch_norm`` call, so the
  outputs are bit-identical). Its ``state_dict`` keys are the original's, so checkpoints load both
  ways. Swapping back reinstates the original module object (parameters keep their identity, so an
  optimizer that holds them still works), with any device/dtype move made meanwhile carried over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gradlab._validate as v
from gradlab.finetune._select import parents_of

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "is_batchnorm",
    "is_pinned",
    "pin_eval",
    "swap_back",
    "swap_frozen",
    "unpin_eval",
]

_ORIGINAL = "_gradlab_original"


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm, lazy and user subclasses of ``_BatchNorm``."""
    return isinstance(module, _BatchNorm)


class _PinnedTrain:
    """Stands in for ``module.train`` on one instance: records the mode, stays in eval mode."""

    def __init__(self, module: nn.Module, hook_id: int) -> None:
        self.module = module
        self.requested = module.training
        self.hook_id = hook_id

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.requested = mode
        type(self.module).train(self.module, False)
        return self.module

    def __repr__(self) -> str:
        return f"<eval-pinned train of {type(self.module).__name__} (requested={self.requested})>"


def _keep_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.__dict__["train"].requested = True
        type(module).train(module, False)


def is_pinned(module: nn.Module) -> bool:
    """Whether ``module`` is eval-pinned by :func:`pin_eval`."""
    return isinstance(module.__dict__.get("train"), _PinnedTrain)


def pin_eval(module: nn.Module) -> bool:
    """Keep ``module`` in eval mode until :func:`unpin_eval`; False if it was already pinned."""
    if is_pinned(module):
        return False
    handle = module.register_forward_pre_hook(_keep_eval)
    module.__dict__["train"] = _PinnedTrain(module, handle.id)
    type(module).train(module, False)
    return True


def unpin_eval(module: nn.Module) -> bool:
    """Undo :func:`pin_eval`, restoring the last requested mode; False if it was not pinned."""
    pinned = module.__dict__.get("train")
    if not isinstance(pinned, _PinnedTrain):
        return False
    del module.__dict__["train"]
    module._forward_pre_hooks.pop(pinned.hook_id, None)
    type(module).train(module, pinned.requested)
    return True


class FrozenBatchNorm(nn.Module):
    r"""BatchNorm with fixed statistics and affine parameters, for inputs of any rank >= 2.

    .. math:: y = \frac{x - \mu_{\text{running}}}{\sqrt{\sigma^2_{\text{running}} + \epsilon}}
              \gamma + \beta

    computed by the same ``F.batch_norm`` call as an eval-mode BatchNorm, so the output is
    bit-identical to the layer it replaces, in train mode as in eval mode. ``weight``, ``bias``,
    ``running_mean``, ``running_var`` (and ``num_batches_tracked``) are buffers, so they are not in
    ``parameters()`` and no optimizer can touch them; the ``state_dict`` keys match BatchNorm's.
    A layer built with ``track_running_stats=False`` has no statistics and normalises with the
    batch statistics, exactly as such a BatchNorm does in eval mode. Like torchvision's
    ``FrozenBatchNorm2d``; :class:`FrozenBatchNorm1d`/``2d``/``3d`` add BatchNorm's input check.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance.
        affine: keep ``weight`` and ``bias`` buffers (ones and zeros when built from scratch).
        track_running_stats: keep running statistics (zeros and ones when built from scratch).
        device: device of the buffers.
        dtype: dtype of the floating-point buffers.

    Example:
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> frozen_bn = FrozenBatchNorm2d.from_batchnorm(bn).train()
        >>> x = torch.randn(2, 3, 4, 4)
        >>> bool(torch.equal(frozen_bn(x), bn(x))), sorted(frozen_bn.state_dict()) == sorted(
        ...     bn.state_dict())
        (True, True)
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        fn = type(self).__name__
        num_features = v.check_int(fn, "num_features", num_features, minimum=1)
        eps = v.check_nonnegative(fn, "eps", eps)
        v.check_bool(fn, "affine", affine)
        v.check_bool(fn, "track_running_stats", track_running_stats)
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        kw: dict = {"device": device, "dtype": dtype}
        self.weight: torch.Tensor | None
        self.bias: torch.Tensor | None
        self.running_mean: torch.Tensor | None
        self.running_var: torch.Tensor | None
        self.register_buffer("weight", torch.ones(num_features, **kw) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **kw) if affine else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of ``bn`` that shares its tensors (no copy of the data).

        Called on :class:`FrozenBatchNorm` itself, picks the 1d/2d/3d subclass matching ``bn``
        (the rank-agnostic base for SyncBatchNorm and other subclasses).

        Raises:
            TypeError: ``bn`` is not a BatchNorm layer.
            ValueError: ``bn`` is a lazy BatchNorm that has not seen an input yet.
        """
        if not is_batchnorm(bn):
            raise TypeError(
                v.message(
                    "FrozenBatchNorm.from_batchnorm",
                    "bn",
                    "a BatchNorm layer",
                    bn,
                    "Pass an nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm module",
                )
            )
        if any(isinstance(t, nn.parameter.UninitializedParameter) for t in bn.parameters()) or any(
            isinstance(t, nn.parameter.UninitializedBuffer) for t in bn.buffers()
        ):
            raise ValueError(
                f"FrozenBatchNorm.from_batchnorm: {type(bn).__name__} is lazy and not initialized; "
                "run one forward pass before swapping in a FrozenBatchNorm"
            )
        if cls is FrozenBatchNorm:
            for base, frozen_cls in _BY_DIM:
                if isinstance(bn, base):
                    cls = frozen_cls
                    break
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_features = bn.num_features  # type: ignore[assignment]
        new.eps = bn.eps  # type: ignore[assignment]
        for name in ("weight", "bias"):
            tensor = getattr(bn, name)
            new.register_buffer(name, None if tensor is None else tensor.detach())
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(bn, name, None))
        new.training = bn.training
        return new

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if self._expected_dims and x.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__}: expected {dims} input (got {x.dim()}D input)")
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2D input (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with the stored statistics (batch statistics if there are none)."""
        self._check_input_dim(x)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.running_mean is None,
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs (replaces BatchNorm1d)."""

    _expected_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` inputs (replaces BatchNorm2d)."""

    _expected_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` inputs (replaces BatchNorm3d)."""

    _expected_dims = (5,)


_BY_DIM: tuple[tuple[type[nn.Module], type[FrozenBatchNorm]], ...] = (
    (nn.BatchNorm1d, FrozenBatchNorm1d),
    (nn.BatchNorm2d, FrozenBatchNorm2d),
    (nn.BatchNorm3d, FrozenBatchNorm3d),
)


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent, key in parents_of(model).get(id(old), []):
        parent._modules[key] = new


def swap_frozen(model: nn.Module, bn: nn.Module) -> FrozenBatchNorm:
    """Replace ``bn`` by a FrozenBatchNorm wherever ``model`` holds it; returns the new module."""
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    object.__setattr__(frozen, _ORIGINAL, bn)
    _replace_everywhere(model, bn, frozen)
    return frozen


def swap_back(model: nn.Module, frozen: nn.Module) -> nn.Module | None:
    """Undo :func:`swap_frozen`: reinstate the original BatchNorm; None if ``frozen`` is not one."""
    original = frozen.__dict__.get(_ORIGINAL)
    if original is None:
        return None
    with torch.no_grad():
        for name, param in original._parameters.items():
            current = frozen._buffers.get(name)
            if param is not None and current is not None and current is not param:
                param.data = current
        for name in original._buffers:
            if name in frozen._buffers:
                original._buffers[name] = frozen._buffers[name]
    original.train(frozen.training)
    del frozen.__dict__[_ORIGINAL]
    _replace_everywhere(model, frozen, original)
    return original
