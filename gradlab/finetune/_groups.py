"""param_groups: optimizer-ready parameter groups with real learning rates.

timm's layer decay writes an ``lr_scale`` into each group that only timm's own schedulers read,
so with a torch scheduler it silently does nothing (timm PR #2532, facebookresearch/mae#216).
Here every group carries its real ``lr``, so any optimizer and any torch LR scheduler (which scale
each group's ``lr`` / ``initial_lr``) apply it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

import gradlab._validate as v
from gradlab.finetune._select import check_model, close_names, name_matches
from gradlab.finetune._wrappers import unwrap

__all__ = ["is_norm_layer", "param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_layer(module: nn.Module) -> bool:
    """Normalization layers: torch's norm types, plus any class whose name contains ``Norm``.

    The name rule catches user and library norms (timm's ``LayerNorm2d``, Hugging Face's
    ``LlamaRMSNorm``, ``T5LayerNorm``) and gradlab's ``FrozenBatchNorm``.
    """
    return isinstance(module, _NORM_TYPES) or any(
        "norm" in cls.__name__.lower() for cls in type(module).__mro__[:-2]
    )


def _check_rate(value: object, what: str, *, upper: float | None = None) -> float:
    return v.check_float("param_groups", what, value, low=0.0, high=upper)


def _block_key(name: str) -> str | None:
    """``"layer2.1"`` for ``"layer2.1.conv1.weight"``: the prefix up to the first number."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _auto_depths(names: list[str]) -> list[int]:
    """Depth ids from numbered blocks: stem 0, block i -> i + 1, what follows the last block ->
    the head (one more); unnumbered parameters between blocks go with the block before them."""
    keys = [_block_key(n) for n in names]
    order: dict[str, int] = {}
    for key in keys:
        if key is not None and key not in order:
            order[key] = len(order) + 1
    numbered = [i for i, k in enumerate(keys) if k is not None]
    if not numbered:
        return [0] * len(names)
    last = numbered[-1]
    depths = []
    current = 0
    for i, key in enumerate(keys):
        if key is not None:
            current = order[key]
        elif i > last:
            current = len(order) + 1
        depths.append(current)
    return depths


def _check_patterns(patterns: Sequence[str], all_names: list[str], what: str) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                v.message(
                    "param_groups",
                    f"each pattern of {what}",
                    "a name glob (str)",
                    pattern,
                    "Pass names such as 'layer1.*' or 'head'",
                )
            )
        if not any(name_matches(pattern, n) for n in all_names):
            raise ValueError(
                f"param_groups: {what} pattern {pattern!r} matches no module or parameter name; "
                f"{close_names(pattern, all_names)}"
            )


def _explicit_depths(
    layers: Sequence[str | Sequence[str]], names: list[list[str]], all_names: list[str]
) -> list[int]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(
            v.message(
                "param_groups",
                "layers",
                "a non-empty sequence of name globs (or sequences of globs)",
                layers,
                "Order them from the input to the head, e.g. ['embed', 'blocks.*', 'head']",
            )
        )
    levels = [[level] if isinstance(level, str) else list(level) for level in layers]
    for level in levels:
        _check_patterns(level, all_names, "layers")
    depths = []
    missing = []
    for aliases in names:
        depth = None
        for k, level in enumerate(levels):
            if any(name_matches(p, a) for p in level for a in aliases):
                depth = k
        if depth is None:
            missing.append(aliases[0])
        depths.append(depth)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        raise ValueError(
            f"param_groups: layers covers no entry for {len(missing)} trainable parameter(s) "
            f"({shown}); add patterns for them (a leading '*' entry puts everything else at "
            "depth 0)"
        )
    return depths  # type: ignore[return-value]


def _no_decay(name_aliases: list[str], owner: nn.Module, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern == "norm" and is_norm_layer(owner):
            return True
        for name in name_aliases:
            if fnmatch.fnmatchcase(name, pattern) or any(
                fnmatch.fnmatchcase(part, pattern) for part in name.split(".")
            ):
                return True
    return False


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    groups: Mapping[str, float] | None = None,
    layer_decay: float | None = None,
    layers: Sequence[str | Sequence[str]] | None = None,
    weight_decay: float = 0.0,
    no_weight_decay: Sequence[str] = ("bias", "norm"),
) -> list[dict[str, Any]]:
    r"""Optimizer-ready parameter groups with real learning rates.

    Each trainable parameter (frozen ones are left out; tied ones appear once, under their first
    name) gets

    .. math:: \text{lr}_p = \text{lr} \cdot m_p \cdot d^{\,D - k_p}

    where :math:`m_p` is its ``groups`` multiplier (1 if no pattern matches), :math:`d` the
    ``layer_decay`` (1 if None), :math:`k_p` its depth and :math:`D` the largest depth (the head),
    so the head gets ``lr`` and each block further from it ``lr * d**k`` (BEiT / timm style).
    Parameters with equal ``(lr, weight_decay)`` share a group; groups come in order of first
    appearance, and no parameter is in two groups.

    **Depth.** By default from numbered blocks: a parameter belongs to the block named by its
    name up to the first numeric component (``blocks.3`` for ``blocks.3.attn.qkv.weight``,
    ``layer2.1`` for ``layer2.1.conv1.weight``, ``encoder.layer.5`` in BERT). Blocks are numbered
    1, 2, ... in order of appearance; parameters before the first block (stem, embeddings) get
    depth 0, those after the last block (final norm, head) the largest depth; unnumbered
    parameters between blocks share the depth of the block before them. A model with no numbered
    blocks has a single depth. Pass ``layers`` to order it yourself: a sequence from the input to
    the head whose ``k``-th entry (a glob, or a sequence of globs of equal depth) gives depth
    ``k``; every trainable parameter must be matched, and the last matching entry wins.

    **Weight decay.** ``weight_decay`` for every parameter except those matched by
    ``no_weight_decay``: an entry excludes parameters whose full name or any dotted component
    matches it as a glob (``"bias"`` matches ``fc.bias``), and the entry ``"norm"`` also excludes
    every parameter owned by a normalization layer, detected by type (BatchNorm, SyncBatchNorm,
    InstanceNorm, LayerNorm, GroupNorm, RMSNorm) or class name (any ``*Norm*`` class).

    **Schedulers.** Every group has a plain ``lr``, so StepLR, CosineAnnealingLR,
    ReduceLROnPlateau, ... scale each group's real lr. OneCycleLR overwrites ``lr`` with its
    ``max_lr``: pass ``max_lr=[g["lr"] for g in groups]`` to keep the ratios.

    Args:
        model: the network.
        lr: base learning rate (the head's, with layer decay).
        groups: discriminative multipliers by glob, ``{"backbone.*": 0.1, "head": 1.0}``; a glob
            matches a parameter name or one of its module prefixes; the last matching entry wins.
        layer_decay: factor in (0, 1] per block of distance from the head; None disables it.
        layers: explicit depth order for ``layer_decay`` (see above); needs ``layer_decay``.
        weight_decay: weight decay of the decayed groups.
        no_weight_decay: globs (and ``"norm"``) of parameters without weight decay.

    Returns:
        A list of dicts with keys ``params``, ``lr``, ``weight_decay``, ready for
        ``torch.optim.AdamW(param_groups(...))``.

    Raises:
        TypeError: ``model`` is not a module or an argument of the wrong type.
        ValueError: a negative rate, a ``layer_decay`` outside (0, 1], a pattern that matches
            nothing (with close names), ``layers`` without ``layer_decay`` or missing parameters.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> for g in param_groups(net, 1e-3, layer_decay=0.5, weight_decay=0.05):
        ...     print(len(g["params"]), round(g["lr"], 6), g["weight_decay"])
        1 0.000125 0.05
        1 0.000125 0.0
        1 0.00025 0.05
        1 0.00025 0.0
        2 0.0005 0.0
        1 0.001 0.05
        1 0.001 0.0
    """
    fn_model = check_model("param_groups", model)
    net, _ = unwrap(fn_model)
    base = _check_rate(lr, "lr")
    decay = _check_rate(weight_decay, "weight_decay")
    if layer_decay is not None:
        layer_decay = v.check_float(
            "param_groups",
            "layer_decay",
            layer_decay,
            low=0.0,
            low_open=True,
            high=1.0,
            fix="Pass e.g. 0.75, or None for no decay",
        )
    if layers is not None and layer_decay is None:
        raise ValueError(
            "param_groups: layers orders the depths for layer_decay, but layer_decay is None; "
            "pass layer_decay=... (or drop layers)"
        )
    if isinstance(no_weight_decay, str):
        raise TypeError(
            v.message(
                "param_groups",
                "no_weight_decay",
                "a sequence of globs (not a single string)",
                no_weight_decay,
                f"Write ({no_weight_decay!r},)",
            )
        )

    aliases: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    owners = {id(p): m for m in net.modules() for p in m.parameters(recurse=False)}
    module_names = [n for n, _ in net.named_modules() if n]
    all_names = module_names + [n for names in aliases.values() for n in names]
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    if groups is not None:
        v.check_type(
            "param_groups",
            "groups",
            groups,
            (Mapping,),
            what="a dict from name globs to lr multipliers (or None)",
            fix="Pass e.g. groups={'backbone.*': 0.1}",
        )
    if not isinstance(no_weight_decay, Sequence):
        raise TypeError(
            v.message(
                "param_groups",
                "no_weight_decay",
                "a sequence of globs",
                no_weight_decay,
                "Pass e.g. ('bias', 'norm'), or () to decay every parameter",
            )
        )
    multipliers = dict(groups or {})
    _check_patterns(list(multipliers), all_names, "groups")
    for pattern, value in multipliers.items():
        _check_rate(value, f"groups[{pattern!r}]")
    for pattern in no_weight_decay:
        if not isinstance(pattern, str):
            raise TypeError(
                v.message(
                    "param_groups",
                    "each pattern of no_weight_decay",
                    "a name glob (str)",
                    pattern,
                    "Pass names such as 'bias' or '*.norm*'",
                )
            )

    names = [aliases[id(p)] for _, p in trainable]
    if layer_decay is None:
        depths = [0] * len(trainable)
    elif layers is None:
        depths = _auto_depths([n for n, _ in trainable])
    else:
        depths = _explicit_depths(layers, names, all_names)
    top = max(depths, default=0)

    out: dict[tuple[float, float], dict[str, Any]] = {}
    for (_, param), alias, depth in zip(trainable, names, depths):
        mult = 1.0
        for pattern, value in multipliers.items():
            if any(name_matches(pattern, a) for a in alias):
                mult = float(value)
        rate = base * mult * (layer_decay ** (top - depth) if layer_decay is not None else 1.0)
        wd = 0.0 if _no_decay(alias, owners[id(param)], no_weight_decay) else decay
        group = out.setdefault((rate, wd), {"params": [], "lr": rate, "weight_decay": wd})
        group["params"].append(param)
    return list(out.values())
