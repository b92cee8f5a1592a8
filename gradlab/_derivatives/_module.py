"""``functional(module)``: a module as a pure function of its parameter dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradlab._validate import check_choice, check_type, message

__all__ = ["FunctionalModule", "functional"]

_BATCHNORM_MODES = ("error", "batch-stats")


class FunctionalModule:
    """A module as a pure function of a parameter dict: ``fm(params, *inputs, **kwargs)``.

    Built by :func:`functional`. ``fm.params`` is a dict of detached copies-free views of the
    module's parameters (``detach()``: same storage, no graph), ready to differentiate by;
    ``params`` passed to the call may hold a subset of the names (the others are the module's
    own, not differentiated). Buffers are the module's own.

    Example:
        >>> import gradlab as gl
        >>> net = torch.nn.Linear(3, 2)
        >>> _ = net.bias.requires_grad_(False)
        >>> fm = gl.functional(net)
        >>> sorted(fm.params), sorted(fm.trainable_params)
        (['bias', 'weight'], ['weight'])
        >>> x = torch.ones(4, 3)
        >>> torch.equal(fm(fm.params, x), net(x))
        True
        >>> fm({"weight": torch.zeros(2, 3)}, x).equal(net.bias.expand(4, 2))  # bias: the module's
        True
        >>> gl.jacobian(lambda p: fm(p, x).sum(), fm.trainable_params)  # d/dW of sum(W x + b)
        {'weight': tensor([[4., 4., 4.],
                [4., 4., 4.]])}
    """

    def __init__(self, module: nn.Module, batchnorm: str) -> None:
        self.module = module
        self.batchnorm = batchnorm

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """``{name: parameter.detach()}`` for every parameter of the module."""
        return {n: p.detach() for n, p in self.module.named_parameters()}

    @property
    def trainable_params(self) -> dict[str, torch.Tensor]:
        """``{name: parameter.detach()}`` for the parameters with ``requires_grad``."""
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def __call__(self, params: Mapping[str, torch.Tensor], *inputs: Any, **kwargs: Any) -> Any:
        if not isinstance(params, Mapping):
            raise TypeError(
                message(
                    "functional",
                    "params",
                    "a dict of tensors keyed by parameter name",
                    params,
                    "Pass fm.params or a dict with some of its keys",
                )
            )
        own = dict(self.module.named_parameters())
        for name, value in params.items():
            ref = own.get(name)
            if ref is None:
                unknown = sorted(n for n in params if n not in own)
                raise ValueError(
                    message(
                        "functional",
                        "params",
                        "keyed by the module's parameter names",
                        f"names the module does not have: {unknown[:5]}",
                        f"Use the keys of .params (e.g. {list(own)[:3]})",
                    )
                )
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                raise (TypeError if not isinstance(value, torch.Tensor) else ValueError)(
                    message(
                        "functional",
                        f"params[{name!r}]",
                        f"a tensor of shape {tuple(ref.shape)} (the module's parameter)",
                        value,
                        "Pass a tensor of the parameter's shape, e.g. from .params",
                    )
                )
        training_bn = [
            (name, m)
            for name, m in self.module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training
            and m.track_running_stats
        ]
        if training_bn and self.batchnorm == "error":
            name, m = training_bn[0]
            raise ValueError(
                f"functional: module {name or type(self.module).__name__!r} "
                f"({type(m).__name__}) is in training mode, so the call would update its running "
                f"statistics in place (which torch.func transforms cannot do, and which would "
                f"modify the module); call .eval() first, or pass batchnorm='batch-stats' to "
                f"normalise with batch statistics without updating the running statistics"
            )
        buffers = dict(self.module.named_buffers())
        if not training_bn:
            return torch.func.functional_call(self.module, (dict(params), buffers), inputs, kwargs)
        # batch-stats: with track_running_stats off, BatchNorm normalises with the batch's
        # statistics and updates nothing; the flag is restored before returning.
        for _, m in training_bn:
            m.track_running_stats = False
        try:
            return torch.func.functional_call(self.module, (dict(params), buffers), inputs, kwargs)
        finally:
            for _, m in training_bn:
                m.track_running_stats = True


def functional(module: nn.Module, *, batchnorm: str = "error") -> FunctionalModule:
    """A module as a pure function ``f(params, *inputs)`` for the derivative functions.

    Calls ``torch.func.functional_call(module, (params, buffers), inputs)`` with the module's own
    buffers, so :func:`jacobian`, :func:`hessian`, :func:`hvp`, ... work w.r.t. a model's
    parameters. The module is never modified: parameters are passed in, not written.

    BatchNorm: in eval mode it uses its running statistics and works with every strategy. In
    training mode a call would update the running statistics in place, which torch.func cannot
    do inside a transform and which would modify the module, so by default (``batchnorm="error"``)
    the call raises a ``ValueError`` saying so. ``batchnorm="batch-stats"`` normalises with the
    batch's statistics and leaves the running statistics untouched (the module's
    ``track_running_stats`` flag is switched off for the duration of the call and restored; not
    thread-safe).

    Args:
        module: the model.
        batchnorm: ``"error"`` or ``"batch-stats"``, see above.

    Returns:
        A :class:`FunctionalModule` ``fm``; ``fm(params, *inputs)`` runs the model and
        ``fm.params`` is its parameter dict.

    Example:
        >>> import gradlab as gl
        >>> net = torch.nn.Linear(3, 2)
        >>> fm = gl.functional(net)
        >>> x = torch.randn(4, 3)
        >>> J = gl.jacobian(lambda p: fm(p, x), fm.params)
        >>> {name: tuple(block.shape) for name, block in J.items()}
        {'weight': (4, 2, 2, 3), 'bias': (4, 2, 2)}
    """
    check_type("functional", "module", module, nn.Module, what="a torch.nn.Module")
    check_choice("functional", "batchnorm", batchnorm, _BATCHNORM_MODES)
    return FunctionalModule(module, batchnorm)
