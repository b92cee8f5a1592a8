"""Plumbing shared by the hook contexts: backward-pass boundaries and handle bookkeeping.

A *backward pass* is one run of the autograd engine: one ``Tensor.backward()`` or one
``torch.autograd.grad()`` call (a double backward is two passes). A hook that fires while no pass
is open opens one and queues a callback on the engine that closes it when the engine finishes
(``Variable._execution_engine.queue_callback``, the mechanism DistributedDataParallel uses).
The engine's graph-task id is remembered too, so a pass that died with an exception (its callback
never runs) does not swallow the next one. Reentrant activation checkpointing runs nested engine
calls, each of which counts as its own pass; use ``use_reentrant=False``.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

__all__ = [
    "REPLAY",
    "HandleBag",
    "HookContext",
    "PassClock",
    "on_grad",
    "register_global_forward_hook",
]


class _Replay(threading.local):
    """How deep this thread is in a per-sample engine's ``torch.func`` replay of a module.

    The replay calls the module again (and its children) on single samples under ``vmap``:
    not a forward of the user's, so the hooks of the other contexts skip it
    (``if REPLAY.depth: return``); recording it would also run ops that vmap cannot batch.
    """

    depth = 0


REPLAY = _Replay()


class PassClock:
    """Tells hooks when a new backward pass starts and runs ``on_end`` when it finishes."""

    __slots__ = ("_on_end", "_on_start", "_task", "count", "open")

    def __init__(
        self,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        # Bound methods are held weakly: the owner holds the clock, not the other way round.
        self._on_start = _weak(on_start)
        self._on_end = _weak(on_end)
        self.count = 0
        self.open = False
        self._task = -1

    def touch(self) -> None:
        """Called first thing in every hook during backward."""
        task = _task_id()
        if self.open and task == self._task:
            return
        self.open = True
        self._task = task
        self.count += 1
        fn = self._on_start()
        if fn is not None:
            fn()
        torch.autograd.Variable._execution_engine.queue_callback(partial(self._end, self.count))

    def _end(self, count: int) -> None:
        if count != self.count:  # a later pass already started: nothing to close
            return
        self.open = False
        fn = self._on_end()
        if fn is not None:
            fn()


class HandleBag:
    """Hook handles to remove on exit; tensor-hook handles of dead tensors are pruned."""

    __slots__ = ("_module", "_tensor")

    def __init__(self) -> None:
        self._module: list[RemovableHandle] = []
        self._tensor: list[RemovableHandle] = []

    def module(self, handle: RemovableHandle) -> None:
        self._module.append(handle)

    def has_module_hooks(self) -> bool:
        return bool(self._module)

    def tensor(self, handle: RemovableHandle) -> None:
        self._tensor.append(handle)
        if len(self._tensor) >= 4096:
            self.prune()

    def prune(self, above: int = 0) -> None:
        """Forget handles whose tensor is gone (their hook dict died with it).

        With ``above``, only when more than that many tensor handles are held.
        """
        if len(self._tensor) > above:
            self._tensor = [h for h in self._tensor if _alive(h)]

    def remove_all(self) -> None:
        """Remove every handle, module and tensor hooks alike; safe to call twice."""
        for h in self._module:
            h.remove()
        for h in self._tensor:
            h.remove()
        self._module.clear()
        self._tensor.clear()


_C = TypeVar("_C", bound="HookContext")


class HookContext:
    """Base of the hook contexts: hooks go in on ``__enter__`` and all come out on ``__exit__``.

    A subclass registers its hooks in :meth:`_install`, handing every handle to ``self._bag``;
    if :meth:`_install` raises, the handles registered so far are removed before the error
    propagates. ``__exit__`` removes every handle (exceptions included), then runs
    :meth:`_after_exit`. :meth:`_check_enter` refuses a second entry while active.
    """

    _name = "context"  # the user-facing name, for messages

    def __init__(self) -> None:
        self._bag = HandleBag()
        self._active = False

    def _check_enter(self) -> None:
        if self._active:
            raise RuntimeError(f"{self._name}: this context is already active; create a new one")

    def _install(self) -> None:
        raise NotImplementedError

    def _deref(self, ref: weakref.ref[Any], name: str) -> Any:
        """The object behind ``ref`` (a module or parameter held weakly), or a clear error."""
        obj = ref()
        if obj is None:
            raise RuntimeError(f"{self._name}: {name!r} no longer exists (its model was deleted)")
        return obj

    def _after_exit(self) -> None:
        """Called at the end of ``__exit__``, after every hook was removed."""

    def __enter__(self: _C) -> _C:
        self._check_enter()
        self._active = True
        try:
            self._install()
        except BaseException:
            self._bag.remove_all()
            self._active = False
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bag.remove_all()
        self._active = False
        self._after_exit()


def _weak(fn: Callable[[], None] | None) -> Callable[[], Callable[[], None] | None]:
    if fn is None:
        return lambda: None
    if hasattr(fn, "__self__"):
        return weakref.WeakMethod(fn)  # type: ignore[arg-type]
    return lambda: fn


_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _alive(handle: Any) -> bool:
    ref = getattr(handle, "hooks_dict_ref", None)
    return ref is None or ref() is not None


def on_grad(t: torch.Tensor, ref: weakref.ref[Any], method: str, *args: Any) -> RemovableHandle:
    """Call ``getattr(ref(), method)(*args, grad)`` with the gradient w.r.t. ``t`` in backward.

    The same as a tensor hook, ``t.register_hook``, that returns nothing: the gradient w.r.t.
    ``t`` *as it is now*, even if ``t`` is modified in place later, fired before ``t.grad_fn``
    runs, and not fired for an output the pass does not reach. For a non-leaf the hook goes
    straight onto ``t.grad_fn`` as a node pre-hook, which costs about half as much to
    register as a tensor hook (that one builds a Python ``OrderedDict`` on the tensor and links it
    to the node). The receiver is held weakly (``ref``): the graph never keeps it alive, and once
    it is gone the hook does nothing. Returns the handle.
    """
    fn = t.grad_fn
    if fn is None:  # a leaf

        def tensor_hook(grad: torch.Tensor) -> None:
            obj = ref()
            if obj is not None:
                getattr(obj, method)(*args, grad)

        return t.register_hook(tensor_hook)
    nr = t.output_nr

    def prehook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        g = grad_outputs[nr]
        if g is not None:
            obj = ref()
            if obj is not None:
                getattr(obj, method)(*args, g)

    return fn.register_prehook(prehook)


_GLOBAL_KWARGS = "with_kwargs" in inspect.signature(_module.register_module_forward_hook).parameters


def register_global_forward_hook(hook: Callable[..., None]) -> RemovableHandle:
    """Register a process-wide module forward hook; return its handle.

    ``hook(module, args, kwargs, output)`` where this torch passes keyword arguments to global
    hooks (2.6 and later), else ``hook(module, args, output)``; write it as
    ``hook(module, args, *rest)`` with ``output = rest[-1]``. A global hook runs for every
    module call in the process, before the module's own forward hooks, so it sees the output
    the module returned, before any of the user's hooks replaces it. Removing the handle
    restores every global hook table of ``torch.nn.modules.module`` exactly.
    """
    if not _GLOBAL_KWARGS:
        return _module.register_module_forward_hook(hook)
    handle = _module.register_module_forward_hook(hook, with_kwargs=True)
    # torch's handle forgets the ``with_kwargs`` entry on removal (each context would leave one
    # behind in ``_global_forward_hooks_with_kwargs``): have it remove that one too.
    kwargs_table = getattr(_module, "_global_forward_hooks_with_kwargs", None)
    if isinstance(kwargs_table, dict):
        handle.extra_dict_ref = (*handle.extra_dict_ref, weakref.ref(kwargs_table))
    return handle
