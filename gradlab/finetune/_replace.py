"""replace_module: swap a submodule by its dotted name."""

from __future__ import annotations

from torch import nn

import gradlab._validate as v
from gradlab.finetune._select import check_model, close_names
from gradlab.finetune._wrappers import unwrap

__all__ = ["replace_module"]


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace the submodule called ``name`` (e.g. ``"layer4.1.fc"``) and return the old one.

    Works through ``nn.Sequential``/``nn.ModuleList`` indices (``"features.3"``) and
    ``nn.ModuleDict`` keys. A module held under several names (shared) is replaced only under the
    name given. ``new_module`` is inserted as it is: it keeps its own device, dtype,
    ``requires_grad`` flags and train/eval mode (move it with ``.to(...)`` to match the model).
    DDP / ``torch.compile`` wrappers are unwrapped, so names are the inner network's.

    Args:
        model: the network.
        name: dotted module name, as in ``model.named_modules()``.
        new_module: the replacement.

    Returns:
        The module that was there before.

    Raises:
        TypeError: ``model`` or ``new_module`` is not a module, ``name`` not a string.
        ValueError: ``name`` is empty (the model itself cannot be replaced in place) or names no
            submodule (the message lists close names).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> old = replace_module(net, "2", nn.Linear(8, 10))
        >>> old, net(torch.randn(3, 4)).shape
        (Linear(in_features=8, out_features=2, bias=True), torch.Size([3, 10]))
    """
    fn = "replace_module"
    check_model(fn, model)
    if not isinstance(name, str):
        raise TypeError(
            v.message(fn, "name", "a dotted module name (str)", name, "Pass e.g. 'layer4.1.bn2'")
        )
    v.check_type(
        fn,
        "new_module",
        new_module,
        nn.Module,
        what="a torch.nn.Module",
        fix="Wrap functions in a module (e.g. nn.Identity() to remove a layer)",
    )
    if not name:
        raise ValueError(
            v.message(
                fn,
                "name",
                "a non-empty module name ('' is the model itself)",
                name,
                "Assign the new model instead",
            )
        )
    net, _ = unwrap(model)
    parent = net
    parts = name.split(".")
    for depth, part in enumerate(parts):
        child = parent._modules.get(part)
        if child is None:
            found = ".".join(parts[:depth]) or "the model"
            names = [n for n, _ in net.named_modules() if n]
            raise ValueError(
                f"{fn}: the model has no submodule {name!r} ({found} has no child {part!r}); "
                f"{close_names(name, names)}"
            )
        if depth == len(parts) - 1:
            parent._modules[part] = new_module
            return child
        parent = child
    raise AssertionError("unreachable")
