"""freeze / unfreeze / frozen: freezing that really freezes.

``requires_grad=False`` alone does not stop an optimizer: a parameter that still holds a (zero)
gradient keeps moving under momentum, weight decay and Adam's moment estimates, and a BatchNorm
layer in train mode keeps updating its running statistics. :func:`freeze` therefore

1. sets ``requires_grad=False`` on every covered parameter **and** sets its ``.grad`` to None.
   PyTorch's optimizers (SGD, Adam, AdamW, ... in their for-loop, foreach and fused forms) skip a
   parameter whose ``.grad`` is None, and ``zero_grad(set_to_none=False)`` leaves a None gradient
   None, so an optimizer created before the freeze no longer moves it: no momentum, no weight
   decay, no Adam step. (Code that writes ``p.grad`` itself, e.g. ``p.grad = torch.zeros_like(p)``
   for every parameter, defeats this; don't.) Optimizer state (momentum buffers, Adam moments) is
   left as it is: after :func:`unfreeze` the first step resumes with it, as it would in plain
   PyTorch.
2. keeps covered BatchNorm layers from changing (``batchnorm=``): ``"eval"`` pins them in eval
   mode even across a later ``model.train()``; ``"frozen"`` swaps in :class:`FrozenBatchNorm`;
   ``"train"`` leaves them alone (their running statistics then keep updating in train mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

import gradlab._validate as v
from gradlab._typing import FreezeTarget
from gradlab.finetune._batchnorm import (
    is_batchnorm,
    is_pinned,
    pin_eval,
    swap_back,
    swap_frozen,
    unpin_eval,
)
from gradlab.finetune._select import check_model, select
from gradlab.finetune._wrappers import unwrap, warn_checkpointing, warn_wrapped

__all__ = ["freeze", "frozen", "trainable_parameters", "unfreeze"]

BATCHNORM_MODES = ("eval", "frozen", "train")


@dataclass
class _Changes:
    """What one freeze call changed, so that :func:`frozen` can undo exactly that."""

    params: list[tuple[nn.Parameter, bool, torch.Tensor | None]] = field(default_factory=list)
    pinned: list[nn.Module] = field(default_factory=list)
    swapped: list[nn.Module] = field(default_factory=list)


def _check_batchnorm(fn: str, batchnorm: object) -> str:
    return v.check_choice(
        fn,
        "batchnorm",
        batchnorm,
        BATCHNORM_MODES,
        fix="'eval' keeps frozen BatchNorm layers in eval mode, 'frozen' swaps in "
        "FrozenBatchNorm, 'train' leaves them alone",
    )  # type: ignore[return-value]


def _freeze(
    model: nn.Module, targets: tuple[FreezeTarget, ...], batchnorm: str, fn: str
) -> _Changes:
    check_model(fn, model)
    mode = _check_batchnorm(fn, batchnorm)
    net, wrappers = unwrap(model)
    selection = select(net, targets, fn=fn)
    changes = _Changes()
    for param in selection.params:
        changes.params.append((param, param.requires_grad, param.grad))
        param.requires_grad_(False)
        param.grad = None
    if mode != "train":
        for module in selection.modules:
            if not is_batchnorm(module):
                continue
            if mode == "eval":
                if pin_eval(module):
                    changes.pinned.append(module)
            else:
                changes.swapped.append(swap_frozen(net, module))
    changed = any(was for _, was, _ in changes.params) or changes.pinned or changes.swapped
    if changed:
        warn_wrapped(wrappers, fn)
        warn_checkpointing(net, fn)
    return changes


def _undo(model: nn.Module, changes: _Changes) -> None:
    net, _ = unwrap(model)
    for module in reversed(changes.swapped):
        swap_back(net, module)
    for module in reversed(changes.pinned):
        unpin_eval(module)
    for param, requires_grad, grad in reversed(changes.params):
        param.requires_grad_(requires_grad)
        param.grad = grad


def freeze(model: nn.Module, *targets: FreezeTarget, batchnorm: str = "eval") -> None:
    """Freeze parameters so that no optimizer step can move them, BatchNorm statistics included.

    Every covered parameter gets ``requires_grad=False`` **and** ``.grad = None``: PyTorch's
    optimizers skip parameters whose gradient is None, so an optimizer created before the freeze
    (SGD with momentum and weight decay, Adam, AdamW, ...) leaves them bit-identical, even with
    ``zero_grad(set_to_none=False)`` in the loop. Covered BatchNorm layers are handled by
    ``batchnorm``. A tied parameter is one tensor: freezing it through any of its names freezes it
    everywhere it is used.

    Targets (see :mod:`gradlab.finetune._select`): name globs matched against module and parameter
    names (a module name covers the module and everything below it; ``*`` also matches dots, so
    ``"*.bn1"`` matches at any depth), module types (``nn.BatchNorm2d``), module objects, or
    parameters. No target freezes the whole model. A BatchNorm layer is handled when a module
    target covers it (a parameter-name glob such as ``"bn1.weight"`` freezes that parameter only).
    DDP / FSDP / ``torch.compile`` wrappers are unwrapped (names are the inner network's) and
    trigger a warning, as does reentrant gradient checkpointing (see
    :mod:`gradlab.finetune._wrappers`).

    Args:
        model: the network.
        *targets: what to freeze; none means everything.
        batchnorm: what happens to covered BatchNorm layers: ``"eval"`` (default) pins them in
            eval mode, so a later ``model.train()`` leaves them in eval mode
            (pytorch/pytorch#9046); ``"frozen"`` replaces them with :class:`FrozenBatchNorm`
            modules (bit-identical outputs, statistics as buffers); ``"train"`` leaves them alone.

    Raises:
        TypeError: ``model`` is not a module, or a target of an unsupported kind.
        ValueError: a target that matches nothing (the message lists close names), a non-leaf
            tensor, an unknown ``batchnorm`` mode.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> gl.freeze(net, "0", nn.BatchNorm1d)
        >>> [name for name, p in net.named_parameters() if p.requires_grad]
        ['2.weight', '2.bias']
        >>> net.train()[1].training
        False
    """
    _freeze(model, targets, batchnorm, "freeze")


def unfreeze(model: nn.Module, *targets: FreezeTarget) -> None:
    """Undo :func:`freeze` for the covered parameters and BatchNorm layers.

    Covered parameters get ``requires_grad=True`` (their ``.grad`` stays None until the next
    backward); covered eval-pinned BatchNorm layers are unpinned and take the mode the last
    ``train()``/``eval()`` call asked for; covered :class:`FrozenBatchNorm` modules that
    :func:`freeze` swapped in are replaced by the original BatchNorm objects (same parameters, so
    an optimizer that holds them keeps working). Targets follow the rules of :func:`freeze`; a
    module type or object also matches a swapped-out BatchNorm. Non-floating-point parameters
    cannot require grad and are skipped. Optimizer state is not touched.

    Args:
        model: the network.
        *targets: what to unfreeze; none means everything.

    Raises:
        TypeError: ``model`` is not a module, or a target of an unsupported kind.
        ValueError: a target that matches nothing (with close names) or a non-leaf tensor.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> gl.freeze(net, batchnorm="frozen")
        >>> type(net[1]).__name__
        'FrozenBatchNorm1d'
        >>> gl.unfreeze(net, "1")
        >>> type(net[1]).__name__, [name for name, p in net.named_parameters() if p.requires_grad]
        ('BatchNorm1d', ['1.weight', '1.bias'])
    """
    fn = "unfreeze"
    check_model(fn, model)
    net, wrappers = unwrap(model)
    changed = False
    for module in select(net, targets, fn=fn).modules:
        if swap_back(net, module) is not None:
            changed = True
    for module in select(net, targets, fn=fn).modules:
        if is_pinned(module):
            changed = unpin_eval(module) or changed
    for param in select(net, targets, fn=fn).params:
        if param.is_floating_point() or param.is_complex():
            changed = changed or not param.requires_grad
            param.requires_grad_(True)
    if changed:
        warn_wrapped(wrappers, fn)


@contextmanager
def frozen(
    model: nn.Module, *targets: FreezeTarget, batchnorm: str = "eval"
) -> Iterator[nn.Module]:
    """Freeze temporarily; on exit restore exactly what was there, exceptions included.

    The GAN pattern: freeze the discriminator while the generator steps. Inside the block the
    targets are frozen as by :func:`freeze`; on exit every parameter gets back its previous
    ``requires_grad`` flag **and its previous** ``.grad`` **tensor** (the same object), pins and
    swaps made on entry are undone, and BatchNorm layers take the mode the last
    ``train()``/``eval()`` call asked for (their mode before the block if none was made inside).
    Anything already frozen before the block stays frozen.

    Args:
        model: the network.
        *targets: what to freeze; none means everything.
        batchnorm: as for :func:`freeze`.

    Yields:
        ``model`` itself.

    Raises:
        TypeError, ValueError: as :func:`freeze`, on entry.

    Example:
        >>> from torch import nn
        >>> disc = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
        >>> with gl.frozen(disc):
        ...     print(any(p.requires_grad for p in disc.parameters()), disc[1].training)
        False False
        >>> all(p.requires_grad for p in disc.parameters()), disc[1].training
        (True, True)
    """
    changes = _freeze(model, targets, batchnorm, "frozen")
    try:
        yield model
    finally:
        _undo(model, changes)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once (tied weights too), in model order.

    Args:
        model: the network.

    Returns:
        A list, ready for an optimizer: ``torch.optim.AdamW(trainable_parameters(net))``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> gl.freeze(net, "0")
        >>> [tuple(p.shape) for p in gl.trainable_parameters(net)]
        [(2, 8), (2,)]
    """
    check_model("trainable_parameters", model)
    net, _ = unwrap(model)
    return [p for p in net.parameters() if p.requires_grad]
