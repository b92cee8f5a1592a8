"""Target matching: which modules and parameters of a model a list of targets names.

A target is one of

- a **name glob** (``fnmatch`` rules, ``*`` also matches dots), matched against every module name
  and every parameter name of the model, tied names included
  (``named_parameters(remove_duplicate=False)``); a module name matches the module and everything
  below it, so ``"layer1"`` covers ``layer1.0.conv1.weight``;
- a **module type** (a subclass of :class:`torch.nn.Module`): every instance in the model;
- a **module object** that is part of the model;
- a **parameter** of the model (a leaf tensor; a non-leaf tensor is refused).

No target at all means the whole model. A target that matches nothing is an error that lists the
closest names (``difflib``), so a typo never silently freezes nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import gradlab._validate as v
from gradlab._typing import FreezeTarget

__all__ = [
    "Selection",
    "check_model",
    "close_names",
    "name_matches",
    "parents_of",
    "select",
]


@dataclass(frozen=True)
class Selection:
    """What a list of targets covers.

    Attributes:
        modules: every covered module (matched modules and all their submodules), unique, in
            ``named_modules`` order.
        params: every covered parameter (parameters of covered modules plus parameters matched
            directly), unique by identity, in ``named_parameters`` order.
    """

    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...]


def check_model(fn: str, model: object) -> nn.Module:
    """``model`` if it is an ``nn.Module``, else a TypeError (gradlab._validate's template)."""
    return v.check_type(
        fn,
        "model",
        model,
        nn.Module,
        what="a torch.nn.Module",
        fix="Pass the network itself (for a parameter list use requires_grad_ directly)",
    )


def close_names(name: str, candidates: Iterable[str], *, n: int = 5) -> str:
    """A sentence listing the candidates closest to ``name`` (for error messages)."""
    pool = sorted({c for c in candidates if c})
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.4)
    if close:
        return "closest names: " + ", ".join(repr(c) for c in close)
    sample = ", ".join(repr(c) for c in pool[:8])
    more = f" (and {len(pool) - 8} more)" if len(pool) > 8 else ""
    return f"no close names; the model has: {sample}{more}" if pool else "the model has no names"


def name_matches(pattern: str, name: str) -> bool:
    """Whether a glob matches ``name`` or one of its module prefixes ("head" ~ "head.weight")."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


def parents_of(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Map ``id(child)`` to every ``(parent, attribute)`` that holds it (shared modules too)."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, key))
    return parents


def _module_identities(module: nn.Module) -> tuple[nn.Module, ...]:
    """A module and, for a swapped-in FrozenBatchNorm, the BatchNorm it stands for."""
    original = getattr(module, "_gradlab_original", None)
    return (module,) if original is None else (module, original)


def _describe(target: object) -> str:
    if isinstance(target, type):
        return f"type {target.__name__}"
    if isinstance(target, torch.Tensor):
        return f"tensor of shape {tuple(target.shape)}"
    if isinstance(target, nn.Module):
        return f"{type(target).__name__} object"
    return repr(target)


def select(model: nn.Module, targets: Sequence[FreezeTarget], *, fn: str) -> Selection:
    """Resolve ``targets`` against ``model`` (see the module docstring for the rules).

    Raises:
        TypeError: a target of an unsupported kind.
        ValueError: a target that matches nothing (with close names), a non-leaf tensor, a tensor
            or module that is not part of ``model``.
    """
    named_modules = list(model.named_modules(remove_duplicate=False))
    named_params = list(model.named_parameters(remove_duplicate=False))
    roots: dict[int, nn.Module] = {}
    direct: dict[int, nn.Parameter] = {}
    if not targets:
        roots[id(model)] = model
    for target in targets:
        if isinstance(target, str):
            mods = [m for name, m in named_modules if fnmatch.fnmatchcase(name, target)]
            pars = [p for name, p in named_params if fnmatch.fnmatchcase(name, target)]
            if not mods and not pars:
                names = [n for n, _ in named_modules] + [n for n, _ in named_params]
                raise ValueError(
                    f"{fn}: target {target!r} matches no module or parameter name of the model; "
                    f"{close_names(target, names)}. Fix the name or glob (fnmatch rules, '*' also "
                    "matches dots)"
                )
            roots.update((id(m), m) for m in mods)
            direct.update((id(p), p) for p in pars)
        elif isinstance(target, type):
            if not issubclass(target, nn.Module):
                raise TypeError(
                    v.message(
                        fn,
                        "a type target",
                        "a torch.nn.Module subclass",
                        target,
                        "Pass a module type such as nn.BatchNorm2d, a name glob, a module or a "
                        "parameter",
                    )
                )
            mods = [
                m
                for _, m in named_modules
                if any(isinstance(i, target) for i in _module_identities(m))
            ]
            if not mods:
                present = sorted({type(m).__name__ for _, m in named_modules})
                raise ValueError(
                    f"{fn}: the model has no module of type {target.__name__}; "
                    f"{close_names(target.__name__, present)}"
                )
            roots.update((id(m), m) for m in mods)
        elif isinstance(target, nn.Module):
            mods = [m for _, m in named_modules if any(i is target for i in _module_identities(m))]
            if not mods:
                raise ValueError(
                    f"{fn}: the {type(target).__name__} object passed as a target is not a "
                    "submodule of model; pass a module from model.modules() (or its name)"
                )
            roots.update((id(m), m) for m in mods)
        elif isinstance(target, torch.Tensor):
            if not target.is_leaf:
                raise ValueError(
                    f"{fn}: got a non-leaf tensor of shape {tuple(target.shape)} (it has grad_fn "
                    f"{type(target.grad_fn).__name__}); only parameters (leaf tensors) can be "
                    "frozen. Pass the parameter itself or its name, not a computed tensor"
                )
            pars = [p for _, p in named_params if p is target]
            if not pars:
                raise ValueError(
                    f"{fn}: the {_describe(target)} passed as a target is not a parameter of "
                    "model; pass one of model.parameters() or its name"
                )
            direct[id(pars[0])] = pars[0]
        else:
            raise TypeError(
                v.message(
                    fn,
                    "each target",
                    "a name glob (str), a module type, a module or a parameter",
                    target,
                    "Pass e.g. 'layer1.*', nn.BatchNorm2d, model.fc or model.fc.weight",
                )
            )
    covered: dict[int, nn.Module] = {}
    for root in roots.values():
        for module in root.modules():
            covered.setdefault(id(module), module)
    modules = tuple(m for m in model.modules() if id(m) in covered)
    wanted = set(direct)
    for module in modules:
        wanted.update(id(p) for p in module.parameters(recurse=False))
    params = tuple(p for _, p in model.named_parameters() if id(p) in wanted)
    return Selection(modules=modules, params=params)
