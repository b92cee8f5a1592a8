"""NaN/Inf tracing for GradientMonitor: which gradients to hook, and who made the first NaN.

The forward side (:class:`CallTracker`) puts a gradient hook on every output of a monitored
module's call and, for tracing, on each input that no other monitored module produced: in a chain
a module's input gradient is its producer's output gradient, so it is recorded once and that
output :class:`Slot` lists the calls consuming it. Modules with ``inplace=True`` get their inputs
hooked before they run (a forward pre-hook), the others after. :func:`find_source` reads one
step's max |g| per slot (NaN/Inf exactly when the gradient is non-finite) in backward order and
names the first module whose backward turned finite gradients into non-finite ones.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from gradlab.hooks._engine import HandleBag, on_grad
from gradlab.hooks._records import NonfiniteSource

__all__ = ["IN", "OUT", "PARAM", "CallTracker", "Slot", "find_source"]

OUT, IN, PARAM = 0, 1, 2  # what a slot's gradient is of: a module output, input, or a parameter
_PRODUCED_MAX = 4096  # producer entries kept before dead ones are dropped (forwards, no backward)


class Slot:
    """One hooked gradient: a module's output or input tensor, or a parameter."""

    __slots__ = ("consumers", "kind", "name", "owner", "seq")

    def __init__(self, kind: int, name: str, seq: int, owner: str = "") -> None:
        self.kind = kind
        self.name = name
        self.seq = seq  # the call (forward order) it belongs to
        self.owner = owner  # a parameter's monitored module
        # Calls that take this output as input; a shared empty tuple until the first one (one
        # fewer object per hooked tensor for the garbage collector to track).
        self.consumers: tuple[tuple[str, int], ...] = ()


class CallTracker:
    """Forward side: hooks the gradients of each monitored call's outputs (and inputs).

    Every hook calls ``target().add(slot, grad)`` (``target`` is held weakly) and its handle
    goes to ``bag``. With ``trace=False`` only outputs are hooked.
    """

    __slots__ = ("__weakref__", "_bag", "_open", "_produced", "_seq", "_target", "trace")

    def __init__(self, bag: HandleBag, target: weakref.ref[Any], trace: bool) -> None:
        self._bag = bag
        self._target = target
        self.trace = trace
        self._seq = 0
        self._open: dict[str, list[int]] = {}  # calls of in-place modules whose inputs are hooked
        self._produced: dict[int, tuple[Any, int, Slot]] = {}  # id(output) -> (ref, version, slot)

    def clear(self) -> None:
        self._produced.clear()
        self._open.clear()

    def prune(self, above: int = 0) -> None:
        """Drop producer entries of dead tensors (only when more than ``above`` are held)."""
        if len(self._produced) > above:
            self._produced = {k: v for k, v in self._produced.items() if v[0]() is not None}

    def before_call(self, name: str, args: Any) -> None:
        """A module that may overwrite its input is about to run: hook the input now."""
        self._seq += 1
        seq = self._seq
        self._open.setdefault(name, []).append(seq)
        if torch.is_grad_enabled():
            self._hook_inputs(name, seq, args)

    def after_call(self, name: str, args: Any, output: Any) -> None:
        """Inputs and outputs of a call, seen after it (modules that do not run in place)."""
        self._seq += 1
        seq = self._seq
        if torch.is_grad_enabled():
            self._hook_inputs(name, seq, args)
            self._hook_outputs(name, seq, output)

    def outputs(self, name: str, output: Any) -> None:
        """Outputs of a call whose inputs were hooked before it, or that are not traced."""
        stack = self._open.get(name)
        if stack:
            seq = stack.pop()
        else:
            self._seq += 1
            seq = self._seq
        if torch.is_grad_enabled():
            self._hook_outputs(name, seq, output)

    def _hook_inputs(self, name: str, seq: int, args: Any) -> None:
        _each_needing_grad(args[0] if len(args) == 1 else args, self._hook_input, name, seq)

    def _hook_input(self, name: str, seq: int, t: torch.Tensor) -> None:
        hit = self._produced.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            hit[2].consumers += ((name, seq),)  # same gradient as that output: reuse it
        else:
            self._bag.tensor(on_grad(t, self._target, "add", Slot(IN, name, seq)))

    def _hook_outputs(self, name: str, seq: int, output: Any) -> None:
        _each_needing_grad(output, self._hook_output, name, seq)

    def _hook_output(self, name: str, seq: int, t: torch.Tensor) -> None:
        slot = Slot(OUT, name, seq)
        self._bag.tensor(on_grad(t, self._target, "add", slot))
        if self.trace:
            produced = self._produced
            produced[id(t)] = (weakref.ref(t), t._version, slot)
            if len(produced) > _PRODUCED_MAX:
                self.prune()


def find_source(step: int, slots: list[Any], linf: list[float]) -> NonfiniteSource | None:
    """The source of the NaN/Inf in a step, from each slot's max |g| in backward order.

    A parameter gradient that is non-finite while its module's output gradient was finite blames
    that module; so does an input gradient (or an output gradient read as a consumer's input)
    of a call whose output gradient was finite. If only output gradients are non-finite from the
    first one on, the first is ``"incoming"``: made by the loss or outside every monitored module.
    """
    bad_calls: set[tuple[str, int]] = set()
    bad_modules: set[str] = set()
    for s, v in zip(slots, linf):
        if s.kind == OUT and not math.isfinite(v):
            bad_calls.add((s.name, s.seq))
            bad_modules.add(s.name)
    first_bad_out: str | None = None
    for i, s in enumerate(slots):  # backward (firing) order
        if math.isfinite(linf[i]):
            continue
        if s.kind == PARAM:
            if s.owner not in bad_modules:
                return NonfiniteSource(s.owner, step, "backward")
            continue
        calls = [(s.name, s.seq)] if s.kind == IN else s.consumers
        for c in calls:
            if c not in bad_calls:
                return NonfiniteSource(c[0], step, "backward")
        if s.kind == OUT and first_bad_out is None:
            first_bad_out = s.name
    if first_bad_out is not None:
        return NonfiniteSource(first_bad_out, step, "incoming")
    return None


def _each_needing_grad(
    obj: Any, fn: Callable[[str, int, torch.Tensor], None], name: str, seq: int
) -> None:
    """``fn(name, seq, t)`` for each tensor ``t`` in ``obj`` (a tensor or a tree of them) that
    requires grad. One tensor, the common case, takes no list and no tree walk."""
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:
            fn(name, seq, obj)
        return
    for t in tree_flatten(obj)[0]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            fn(name, seq, t)
