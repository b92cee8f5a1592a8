"""capture_grads: gradients w.r.t. module outputs, inputs or parameters, keyed by name."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from gradlab._validate import check_choice
from gradlab.hooks._engine import (
    REPLAY,
    HookContext,
    PassClock,
    on_grad,
    register_global_forward_hook,
)
from gradlab.hooks._select import check_model, select_modules

__all__ = ["CapturedGrads", "capture_grads"]

Of = Literal["output", "input", "parameter"]
_OFS = ("output", "input", "parameter")
_REPR_KEYS = 8  # keys shown by repr: shapes only, never values


class CapturedGrads(HookContext, Mapping[str, torch.Tensor]):
    """The gradients seen by :func:`capture_grads`: a read-only mapping ``key -> Tensor``.

    Keys are module names (``of="output"`` / ``"input"``) or parameter names
    (``of="parameter"``). A module whose output (input) holds several tensors, e.g. an LSTM's
    ``(out, (h, c))``, gets one key per tensor in flattening order: ``"lstm[0]"``, ``"lstm[1]"``,
    ``"lstm[2]"``. Every value is a tensor (fixed return type); a key is present only when the
    last backward pass reached that tensor.

    Semantics (see :func:`capture_grads` for the full story):

    * ``grads[key]``: the gradient from the **last backward pass**, of the **last call** of the
      module in forward order (the only call for most modules).
    * ``grads.calls(key)``: every call's gradient from the last backward pass, in forward order.
    * ``grads.backward_passes``: how many backward passes fired a hook so far.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import capture_grads
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> with capture_grads(net) as grads:
        ...     net(torch.randn(2, 3)).sum().backward()
        >>> sorted(grads), grads["2"].tolist(), len(grads.calls("2")), grads.backward_passes
        (['0', '1', '2'], [[1.0], [1.0]], 1, 1)
    """

    _name = "capture_grads"

    def __init__(self, model: nn.Module, patterns: tuple[str, ...], of: Of) -> None:
        super().__init__()
        # Held weakly: the result must not keep the model (or its layers) alive.
        selected = [] if of == "parameter" else select_modules("capture_grads", model, patterns)
        self._selected = [(n, weakref.ref(m)) for n, m in selected]
        # id(module) -> (name, weakref); the weakref guards against a recycled id.
        self._by_id = {id(m): (n, r) for n, r in self._selected for m in (r(),)}
        params = _select_params(model, patterns) if of == "parameter" else []
        self._params = [(n, weakref.ref(p)) for n, p in params]
        self._of = of
        self._data: dict[str, dict[int, torch.Tensor]] = {}
        self._seq = 0
        self._clock = PassClock(on_start=self._start_pass)
        self._ref = weakref.ref(self)

    # -- context --------------------------------------------------------------------------
    def _install(self) -> None:
        ref = self._ref
        if self._of == "output":
            for name, module_ref in self._selected:
                self._deref(module_ref, name)
            # One process-wide forward hook instead of one per module: entering and leaving
            # the context costs two registrations whatever the model's size. It ignores
            # every module that was not selected.
            if self._by_id:
                self._bag.module(register_global_forward_hook(_output_hook(ref, self._by_id)))
        for name, module_ref in self._selected if self._of == "input" else ():
            module = self._deref(module_ref, name)
            h = module.register_forward_pre_hook(_input_hook(ref, name), with_kwargs=True)
            self._bag.module(h)
        for i, (pname, p_ref) in enumerate(self._params):
            p = self._deref(p_ref, pname)
            self._bag.module(p.register_post_accumulate_grad_hook(_param_hook(ref, pname, i)))

    # -- recording (called from hooks) ----------------------------------------------------
    def _start_pass(self) -> None:
        self._data.clear()

    def _hook_tensors(self, value: Any, name: str) -> None:
        if not torch.is_grad_enabled():
            return
        self._seq += 1
        seq = self._seq
        if isinstance(value, torch.Tensor):  # fast path: one tensor
            if value.requires_grad:
                self._bag.tensor(on_grad(value, self._ref, "_record", name, seq))
            return
        tens = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        ref = self._ref
        for pos, t in enumerate(tens):
            if not t.requires_grad:
                continue
            key = name if len(tens) == 1 else f"{name}[{pos}]"
            self._bag.tensor(on_grad(t, ref, "_record", key, seq))

    def _record(self, key: str, seq: int, grad: torch.Tensor) -> None:
        self._clock.touch()
        # Keep the engine's own tensor (no copy). Holding a reference also stops AccumulateGrad
        # from stealing it into a leaf's .grad, where a later backward would update it in place.
        self._data.setdefault(key, {})[seq] = grad.detach() if grad.requires_grad else grad

    # -- mapping --------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        calls = self._data.get(key)
        if not calls:
            raise KeyError(self._missing(key))
        return calls[max(calls)]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._data, key=lambda k: min(self._data[k])))

    def __len__(self) -> int:
        return len(self._data)

    def calls(self, key: str) -> list[torch.Tensor]:
        """Every call's gradient for ``key`` from the last backward pass, in forward order.

        A module called twice in one forward (a shared block, an RNN cell) gives two entries;
        ``grads[key]`` is the last of them. Calls that the last backward pass did not reach are
        absent. For ``of="parameter"`` the list has one entry.

        Raises:
            KeyError: no gradient was recorded for ``key`` in the last backward pass.
        """
        calls = self._data.get(key)
        if not calls:
            raise KeyError(self._missing(key))
        return [calls[s] for s in sorted(calls)]

    @property
    def backward_passes(self) -> int:
        """Number of backward passes (engine runs) that fired one of this context's hooks."""
        return self._clock.count

    def _missing(self, key: str) -> str:
        have = ", ".join(repr(k) for k in list(self)[:8]) or "none"
        multi = [k for k in self._data if k.startswith(f"{key}[")]
        if multi:
            return (
                f"capture_grads: {key!r} has several tensors; use the keys "
                f"{', '.join(repr(k) for k in sorted(multi))}"
            )
        return (
            f"capture_grads: no gradient for {key!r} in the last backward pass (recorded: {have}). "
            "Is the name right, did the forward run inside the context, and does the tensor "
            "require grad and reach the loss?"
        )

    def __repr__(self) -> str:
        keys = list(self)
        shown = [f"{k!r}: {tuple(self[k].shape)}" for k in keys[:_REPR_KEYS]]
        if len(keys) > _REPR_KEYS:
            shown.append(f"... {len(keys) - _REPR_KEYS} more")
        return f"CapturedGrads(of={self._of!r}, {{{', '.join(shown)}}})"


def _output_hook(
    ref: weakref.ref[CapturedGrads], by_id: dict[int, tuple[str, weakref.ref[nn.Module]]]
) -> Any:
    get = by_id.get

    def hook(module: nn.Module, args: Any, *rest: Any) -> None:  # rest: ([kwargs,] output)
        hit = get(id(module))
        if hit is None or hit[1]() is not module or REPLAY.depth:  # REPLAY: not the user's call
            return
        store = ref()
        if store is not None:
            store._hook_tensors(rest[-1], hit[0])

    return hook


def _input_hook(ref: weakref.ref[CapturedGrads], name: str) -> Any:
    # A forward *pre*-hook: the inputs are hooked before the module runs, so an in-place module
    # (ReLU(inplace=True)) still reports the gradient w.r.t. the value it received.
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        store = ref()
        if store is not None and not REPLAY.depth:
            store._hook_tensors(
                (args, kwargs) if kwargs else args[0] if len(args) == 1 else args, name
            )

    return hook


def _param_hook(ref: weakref.ref[CapturedGrads], name: str, index: int) -> Any:
    def hook(p: torch.Tensor) -> None:
        store = ref()
        if store is not None and p.grad is not None:
            store._clock.touch()
            store._data[name] = {-len(store._params) + index: p.grad.detach().clone()}

    return hook


def _select_params(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    if not patterns:
        named = list(model.named_parameters())
    else:
        named = []
        seen: set[int] = set()
        for mname, module in select_modules("capture_grads", model, patterns):
            prefix = f"{mname}." if mname else ""
            for pname, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((prefix + pname, p))
    return [(n, p) for n, p in named if p.requires_grad]


def capture_grads(model: nn.Module, *patterns: str, of: Of = "output") -> CapturedGrads:
    r"""Capture gradients w.r.t. module outputs, inputs or parameters during backward.

    Use it as a context manager around the forward *and* backward pass: forward hooks on the
    selected modules register a gradient hook on each output (``of="output"``) or input
    (``of="input"``, from a forward pre-hook, so the value before any in-place op) that requires
    grad, and the gradient hooks store :math:`\partial L / \partial y` when backward reaches it.
    Gradient (tensor) hooks instead of module full-backward hooks: cheaper, and they work with
    in-place modules such as ``nn.ReLU(inplace=True)``. For speed, ``of="output"`` uses one
    process-wide forward hook (``register_module_forward_hook``) for the context's lifetime
    instead of one per module, and puts each gradient hook on the output's ``grad_fn`` (a node
    pre-hook, the same gradient as a tensor hook). Two consequences: the output recorded is the one
    the module's ``forward`` returned, before any forward hook of yours replaces it; and while the
    context is open every module call in the process (other models included) pays one dictionary
    look-up, about a microsecond, so keep the context around the steps you want to capture.
    ``of="parameter"`` records each parameter's
    ``.grad`` right after it is accumulated (``register_post_accumulate_grad_hook``), keyed by
    parameter name; it sees ``backward()`` only (``autograd.grad`` does not accumulate).

    Semantics:

    * **Several calls in one forward** (shared modules, RNN cells): every call is kept.
      ``grads[key]`` is the last call's gradient, ``grads.calls(key)`` all of them in forward
      order.
    * **Several backward passes**: the last pass wins. A pass (one ``backward()`` or
      ``autograd.grad()`` run) that fires any hook of this context first clears what the
      previous one stored, so the mapping always describes one pass. Use
      :func:`retain_grads` for ``.grad``-style accumulation. Activation checkpointing works
      with ``use_reentrant=False``; reentrant checkpointing runs nested engine passes, each of
      which counts as a pass of its own.
    * **Double backward** (``autograd.grad(..., create_graph=True)`` then ``penalty.backward()``,
      as in a gradient penalty): the second pass fires the hooks again, so afterwards the mapping
      holds the gradients of the second pass. Stored gradients are always detached, so they never
      keep a graph alive.
    * Stored gradients are the engine's tensors, not copies (of="parameter" copies, since
      ``.grad`` changes in place). They stay valid after the context exits; the context holds no
      reference to the model, and dropping the result frees them.

    Every hook (module, tensor and parameter hooks) is removed in ``__exit__``, exceptions
    included; a forward run after the context leaves no trace.

    Args:
        model: the network.
        *patterns: module-name globs (:func:`fnmatch.fnmatchcase`, e.g. ``"layer1.*"``,
            ``"*.conv1"``); none selects every leaf module (for ``of="parameter"``: every
            parameter that requires grad).
        of: ``"output"`` (default), ``"input"`` or ``"parameter"``.

    Returns:
        A :class:`CapturedGrads` mapping, filled during backward.

    Raises:
        TypeError: ``model`` is not a module or a pattern is not a string.
        ValueError: ``of`` is unknown, or a pattern matches no module (the message lists module
            names).

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import capture_grads
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
        >>> with capture_grads(net) as grads:
        ...     net(torch.randn(3, 4)).sum().backward()
        >>> sorted(grads), tuple(grads["0"].shape)
        (['0', '1', '2'], (3, 8))
        >>> grads["2"]
        tensor([[1.],
                [1.],
                [1.]])
    """
    check_model("capture_grads", model)
    check_choice("capture_grads", "of", of, _OFS)
    return CapturedGrads(model, patterns, of)
