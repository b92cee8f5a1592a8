"""GradualUnfreezing: unfreeze stage by stage into an existing optimizer and LR scheduler.

Adding a param group to an optimizer behind a running scheduler breaks torch's schedulers in
several ways: ReduceLROnPlateau indexes ``min_lrs`` per group (IndexError / RuntimeError, Lightning
#8720), OneCycleLR reads per-group ``initial_lr``/``max_lr``/``min_lr`` keys (KeyError,
transformers#20029), and the closed-form schedulers zip ``base_lrs`` with the groups (silently
skipping, or with ``strict=True`` failing on, the new group). GradualUnfreezing extends each
scheduler's per-group state along with the optimizer, and refuses, when it is built, a scheduler
it does not know how to extend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer, lr_scheduler

import gradlab._validate as v
from gradlab._typing import FreezeTarget
from gradlab.finetune._freeze import _check_batchnorm, freeze, unfreeze
from gradlab.finetune._select import check_model, select
from gradlab.finetune._wrappers import unwrap

__all__ = ["GradualUnfreezing"]

_FN = "GradualUnfreezing"
_Scheduler = Any  # torch's LRScheduler / ReduceLROnPlateau (a subclass only in newer torch)


def _leaves(scheduler: _Scheduler) -> list[_Scheduler]:
    """The schedulers that hold per-group state (SequentialLR / ChainedScheduler opened up)."""
    if isinstance(scheduler, lr_scheduler.SequentialLR | lr_scheduler.ChainedScheduler):
        return [leaf for s in scheduler._schedulers for leaf in _leaves(s)]
    return [scheduler]


def _check_scheduler(scheduler: _Scheduler, optimizer: Optimizer) -> None:
    known = (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)
    if not isinstance(scheduler, known):
        raise TypeError(
            v.message(
                _FN,
                "scheduler",
                "a torch.optim.lr_scheduler scheduler (or None)",
                scheduler,
                "Pass e.g. torch.optim.lr_scheduler.StepLR(optimizer, 10)",
            )
        )
    for leaf in _leaves(scheduler):
        if leaf.optimizer is not optimizer:
            raise ValueError(f"{_FN}: scheduler {type(leaf).__name__} drives another optimizer")
        lambdas = getattr(leaf, "lr_lambdas", None)
        if lambdas is not None and any(f is not lambdas[0] for f in lambdas):
            raise ValueError(
                f"{_FN}: {type(leaf).__name__} has a different lr_lambda per param group, so the "
                "lambda for a new group is unknown; use a single lr_lambda"
            )
        min_lrs = getattr(leaf, "min_lrs", None)
        if isinstance(leaf, lr_scheduler.ReduceLROnPlateau) and len(set(min_lrs or [0])) > 1:
            raise ValueError(
                f"{_FN}: ReduceLROnPlateau has a different min_lr per param group, so the min_lr "
                "for a new group is unknown; pass a single min_lr"
            )


def _cyclic(scheduler: _Scheduler | None) -> _Scheduler | None:
    """The OneCycleLR / CyclicLR driving the optimizer, if any (their stage lr is the peak)."""
    if scheduler is None:
        return None
    for leaf in _leaves(scheduler):
        if isinstance(leaf, lr_scheduler.OneCycleLR | lr_scheduler.CyclicLR):
            return leaf
    return None


def _peak(leaf: _Scheduler, group: dict[str, Any]) -> float:
    if isinstance(leaf, lr_scheduler.OneCycleLR):
        return float(group["max_lr"])
    return float(leaf.max_lrs[0])


class GradualUnfreezing:
    r"""Unfreeze a model stage by stage (ULMFiT / Lightning ``BackboneFinetuning`` style).

    On construction every stage is frozen (with :func:`freeze`, ``batchnorm`` as given); the rest
    of the model (the head) trains from the start with the optimizer you built over it. Call
    :meth:`step` once per epoch (or per step: the unit is yours), like an LR scheduler; when the
    count reaches ``milestones[k]``, stage ``k`` is unfrozen and its parameters join the optimizer
    as a new param group, and the scheduler's per-group state is extended so that it drives the new
    group too.

    **Learning rates.** Stage ``k`` has a base lr: ``lr[k]`` (a sequence), or ``lr`` (a float),
    or, when ``lr`` is None, the base lr of the optimizer's first group; times
    ``layer_decay**(k + 1)`` (ULMFiT's discriminative rates: stage 0 is the one next to the head).
    A base lr means what the ``lr`` given to an optimizer means: the group joins at the current
    point of the schedule, with ``lr = base * (current lr / base lr)`` of the first group, and the
    scheduler moves it from there as if it had been in the optimizer from the start. The first
    group's base lr is its ``initial_lr`` (set by torch's schedulers) or else its lr when
    GradualUnfreezing was built. With OneCycleLR and CyclicLR the stage lr is the new group's
    peak (``max_lr``, the number those schedulers are given); its lower bounds keep the first
    group's ratios (OneCycleLR's ``div_factor``/``final_div_factor``, CyclicLR's
    ``base_lr/max_lr``) and its momentum range is the first group's.

    **Schedulers** (``scheduler=``): every torch scheduler built on ``base_lrs`` (StepLR,
    MultiStepLR, ExponentialLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, LinearLR,
    ConstantLR, PolynomialLR, LambdaLR / MultiplicativeLR with a single lambda), OneCycleLR,
    CyclicLR, ReduceLROnPlateau (with a single ``min_lr``), and SequentialLR / ChainedScheduler of
    those. Anything else is refused when GradualUnfreezing is built.

    New groups get the optimizer's defaults for everything but ``lr`` (weight decay included).
    Stages may not share parameters, and the optimizer may not already hold a stage's parameters
    (it could not take them as a new group): build it over the head, e.g. over
    :func:`trainable_parameters` after :func:`freeze` of the stages.

    Args:
        model: the network.
        optimizer: the optimizer over the parameters that train from the start.
        stages: what each stage unfreezes, in unfreezing order: a target, or a sequence of
            targets (name globs, module types, modules, parameters, as for :func:`freeze`).
        milestones: the :meth:`step` count at which each stage unfreezes, non-decreasing ints >= 1;
            default ``1, 2, ..., len(stages)`` (one stage per epoch, ULMFiT).
        lr: base lr per stage (a float for all, a sequence for each), or None (see above).
        layer_decay: stage ``k`` gets ``lr * layer_decay**(k + 1)``; None for 1. Only with a
            float or None ``lr``.
        scheduler: the LR scheduler driving ``optimizer``, if any.
        batchnorm: what freezing does to the stages' BatchNorm layers (see :func:`freeze`).

    Raises:
        TypeError: wrong argument types, an unsupported scheduler.
        ValueError: bad milestones or rates, overlapping stages, stage parameters already in the
            optimizer, a stage that matches nothing.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net[2].parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> unfreezer = GradualUnfreezing(net, opt, ["1", "0"], lr=0.1, layer_decay=0.5,
        ...                               scheduler=sched)
        >>> for epoch in range(3):
        ...     opt.step(); sched.step()
        ...     print(epoch, unfreezer.step(), [round(g["lr"], 5) for g in opt.param_groups])
        0 (0,) [0.05, 0.025]
        1 (1,) [0.025, 0.0125, 0.00625]
        2 () [0.0125, 0.00625, 0.00313]
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        stages: Sequence[FreezeTarget | Sequence[FreezeTarget]],
        *,
        milestones: Sequence[int] | None = None,
        lr: float | Sequence[float] | None = None,
        layer_decay: float | None = None,
        scheduler: _Scheduler | None = None,
        batchnorm: str = "eval",
    ) -> None:
        check_model(_FN, model)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                v.message(
                    _FN,
                    "optimizer",
                    "a torch.optim.Optimizer",
                    optimizer,
                    "Pass the optimizer over the parameters that train from the start",
                )
            )
        _check_batchnorm(_FN, batchnorm)
        if isinstance(stages, str | nn.Module | type) or not isinstance(stages, Sequence):
            raise TypeError(
                v.message(
                    _FN,
                    "stages",
                    "a sequence of stages (each a target or a sequence of targets)",
                    stages,
                    "Pass e.g. ['layer4', 'layer3']",
                )
            )
        if not stages:
            raise ValueError(
                v.message(_FN, "stages", "non-empty", stages, "Give at least one stage to unfreeze")
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stages: tuple[tuple[FreezeTarget, ...], ...] = tuple(
            (s,)
            if isinstance(s, str | nn.Module | type) or not isinstance(s, Sequence)
            else tuple(s)
            for s in stages
        )
        n = len(self.stages)
        self.milestones = self._check_milestones(milestones, n)
        self._stage_lrs = self._check_lrs(lr, layer_decay, n)
        self._decay = 1.0 if layer_decay is None else float(layer_decay)
        if scheduler is not None:
            _check_scheduler(scheduler, optimizer)
        net, _ = unwrap(model)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        seen: dict[int, int] = {}
        for k, stage in enumerate(self.stages):
            for p in select(net, stage, fn=_FN).params:
                if id(p) in in_optimizer:
                    raise ValueError(
                        f"{_FN}: the optimizer already holds parameters of stage {k} {stage!r}; "
                        "build it over the parameters that train from the start (e.g. "
                        "trainable_parameters(model) after freeze(model, *stages))"
                    )
                if seen.setdefault(id(p), k) != k:
                    raise ValueError(
                        f"{_FN}: stages {seen[id(p)]} and {k} share parameters; each parameter "
                        "may unfreeze in one stage only"
                    )
        first = optimizer.param_groups[0]
        self._reference_lr = float(first["lr"])
        for stage in self.stages:
            freeze(model, *stage, batchnorm=batchnorm)
        self.count = 0
        self.unfrozen: list[bool] = [False] * n

    @staticmethod
    def _check_milestones(milestones: Sequence[int] | None, n: int) -> tuple[int, ...]:
        if milestones is None:
            return tuple(range(1, n + 1))
        values = tuple(milestones)
        ok = all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in values)
        if len(values) != n or not ok or list(values) != sorted(values):
            raise ValueError(
                v.message(
                    _FN,
                    "milestones",
                    f"{n} non-decreasing ints >= 1 (one per stage)",
                    milestones,
                    "Pass one step count per stage, e.g. "
                    f"{list(range(1, n + 1))}, or None for one stage per step",
                )
            )
        return values

    @staticmethod
    def _check_lrs(
        lr: float | Sequence[float] | None, layer_decay: float | None, n: int
    ) -> list[float | None]:
        def number(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and x >= 0  # type: ignore[operator]

        if layer_decay is not None and not (number(layer_decay) and 0 < layer_decay <= 1):
            raise ValueError(
                v.message(
                    _FN,
                    "layer_decay",
                    "a number in (0, 1]",
                    layer_decay,
                    "Pass e.g. 0.5, or None for no decay",
                )
            )
        decay = 1.0 if layer_decay is None else float(layer_decay)
        if lr is None or number(lr):
            return [None if lr is None else float(lr) * decay ** (k + 1) for k in range(n)]  # type: ignore[arg-type]
        if isinstance(lr, Sequence) and not isinstance(lr, str):
            if layer_decay is not None:
                raise ValueError(
                    f"{_FN}: pass either one lr per stage or layer_decay, not both; a sequence "
                    "of lrs already sets each stage's rate"
                )
            if len(lr) != n or not all(number(x) for x in lr):
                raise ValueError(
                    v.message(
                        _FN,
                        "lr",
                        f"{n} numbers >= 0 (one per stage)",
                        lr,
                        "Pass one rate per stage, or a single float",
                    )
                )
            return [float(x) for x in lr]
        raise TypeError(
            v.message(
                _FN,
                "lr",
                "a float, a sequence of floats or None",
                lr,
                "Pass e.g. lr=1e-4, or one rate per stage",
            )
        )

    def _base_lr(self, k: int) -> float:
        given = self._stage_lrs[k]
        if given is not None:
            return given
        first = self.optimizer.param_groups[0]
        cyclic = _cyclic(self.scheduler)
        if cyclic is not None:
            reference = _peak(cyclic, first)
        else:
            reference = float(first.get("initial_lr", self._reference_lr))
        return reference * self._decay ** (k + 1)

    def step(self) -> tuple[int, ...]:
        """Advance the count by one and unfreeze the stages whose milestone is reached.

        Returns:
            The indices of the stages unfrozen by this call (often empty).
        """
        self.count += 1
        done = []
        for k, milestone in enumerate(self.milestones):
            if not self.unfrozen[k] and milestone <= self.count:
                self._unfreeze_stage(k)
                done.append(k)
        return tuple(done)

    def _unfreeze_stage(self, k: int) -> None:
        net, _ = unwrap(self.model)
        unfreeze(self.model, *self.stages[k])
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        params = [
            p
            for p in select(net, self.stages[k], fn=_FN).params
            if p.requires_grad and id(p) not in in_optimizer
        ]
        self.unfrozen[k] = True
        if not params:
            return
        first = self.optimizer.param_groups[0]
        base = self._base_lr(k)
        group: dict[str, Any] = {"params": params}
        if "param_names" in first:  # torch >= 2.6 optimizers built from named_parameters()
            names = {id(p): n for n, p in net.named_parameters()}
            group["param_names"] = [names[id(p)] for p in params]
        cyclic = _cyclic(self.scheduler)
        if isinstance(cyclic, lr_scheduler.OneCycleLR):
            div = float(first["max_lr"]) / float(first["initial_lr"])
            final = float(first["initial_lr"]) / float(first["min_lr"])
            group["max_lr"] = base
            group["initial_lr"] = base / div
            group["min_lr"] = group["initial_lr"] / final
        elif cyclic is not None:
            group["initial_lr"] = base * float(cyclic.base_lrs[0]) / float(cyclic.max_lrs[0])
        if cyclic is not None:
            group["lr"] = base * float(first["lr"]) / _peak(cyclic, first)
            for key in ("max_momentum", "base_momentum", "momentum", "betas"):
                if key in first:
                    group[key] = first[key]
        else:
            reference = float(first.get("initial_lr", self._reference_lr))
            scale = float(first["lr"]) / reference if reference else 1.0
            group["lr"] = base * scale
            if "initial_lr" in first:
                group["initial_lr"] = base
        self.optimizer.add_param_group(group)
        if self.scheduler is not None:
            self._extend(self.scheduler, group, base)

    def _extend(self, scheduler: _Scheduler, group: dict[str, Any], base: float) -> None:
        for leaf in _leaves(scheduler):
            if isinstance(leaf, lr_scheduler.ReduceLROnPlateau):
                leaf.min_lrs.append(leaf.min_lrs[0])
            elif isinstance(leaf, lr_scheduler.OneCycleLR):
                pass  # reads the group's own keys, set in _unfreeze_stage
            elif isinstance(leaf, lr_scheduler.CyclicLR):
                leaf.base_lrs.append(group["initial_lr"])
                leaf.max_lrs.append(base)
                if getattr(leaf, "cycle_momentum", False):
                    leaf.base_momentums.append(leaf.base_momentums[0])
                    leaf.max_momentums.append(leaf.max_momentums[0])
            if hasattr(leaf, "base_lrs") and not isinstance(leaf, lr_scheduler.CyclicLR):
                if len(leaf.base_lrs) < len(self.optimizer.param_groups):
                    leaf.base_lrs.append(group.get("initial_lr", base))
            lambdas = getattr(leaf, "lr_lambdas", None)
            if lambdas is not None:
                lambdas.append(lambdas[0])
        for s in {id(s): s for s in [scheduler, *_leaves(scheduler)]}.values():
            last = getattr(s, "_last_lr", None)
            if isinstance(last, list) and len(last) < len(self.optimizer.param_groups):
                last.append(group["lr"])

    def state_dict(self) -> dict[str, Any]:
        """The unfreezing progress, for a checkpoint: step count, unfrozen stages, milestones.

        Plain ints, floats and lists: ``torch.save`` / ``torch.load(weights_only=True)``,
        pickle and deepcopy all take it. See :meth:`load_state_dict` for the resume order.
        """
        return {
            "count": self.count,
            "unfrozen": list(self.unfrozen),
            "milestones": list(self.milestones),
            "reference_lr": self._reference_lr,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: unfreeze the stages the saved run had unfrozen, and continue its count.

        The stages are unfrozen in the order the saved run unfroze them, each joining the
        optimizer as a param group and extending the scheduler, so the optimizer and the
        scheduler then have the saved run's groups. Call it **before** their own
        ``load_state_dict`` (which would otherwise fail with "loaded state dict has a different
        number of parameter groups"); they then restore every group's lr, momentum buffers and
        schedule, so the resumed run is bit-identical to an uninterrupted one::

            model.load_state_dict(ckpt["model"])
            unfreezer.load_state_dict(ckpt["unfreezer"])  # first: adds the param groups
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])

        Build this GradualUnfreezing as the saved one was built (same stages and milestones).
        The state dict is not modified.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: a key is missing, the number of stages or the milestones differ from
                the saved run's, or a stage unfrozen here is frozen in the saved state (a
                stage cannot leave the optimizer again).
        """
        fn = f"{_FN}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(
                v.message(
                    fn,
                    "state_dict",
                    "a dict",
                    state_dict,
                    "Pass the dict returned by GradualUnfreezing.state_dict()",
                )
            )
        missing = [
            k for k in ("count", "unfrozen", "milestones", "reference_lr") if k not in state_dict
        ]
        if missing:
            raise ValueError(
                f"{fn}: state_dict lacks {', '.join(map(repr, missing))}; pass the dict returned "
                "by GradualUnfreezing.state_dict()"
            )
        unfrozen = [bool(u) for u in state_dict["unfrozen"]]
        milestones = tuple(int(m) for m in state_dict["milestones"])
        if len(unfrozen) != len(self.stages) or milestones != self.milestones:
            raise ValueError(
                f"{fn}: this GradualUnfreezing has {len(self.stages)} stages with milestones "
                f"{list(self.milestones)}, the saved one {len(unfrozen)} with "
                f"{list(milestones)}; build it with the saved run's stages and milestones"
            )
        for k, (here, saved) in enumerate(zip(self.unfrozen, unfrozen)):
            if here and not saved:
                raise ValueError(
                    f"{fn}: stage {k} is already unfrozen here but frozen in the saved state; "
                    "load the state into a freshly built GradualUnfreezing"
                )
        self._reference_lr = float(state_dict["reference_lr"])
        for k, saved in enumerate(unfrozen):  # milestones are non-decreasing: the saved order
            if saved and not self.unfrozen[k]:
                self._unfreeze_stage(k)
        self.count = int(state_dict["count"])

    def __repr__(self) -> str:
        done = sum(self.unfrozen)
        return (
            f"GradualUnfreezing(stages={len(self.stages)}, unfrozen={done}, count={self.count}, "
            f"milestones={list(self.milestones)})"
        )
