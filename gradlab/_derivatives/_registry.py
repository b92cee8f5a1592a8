"""One registry of strategies per operation, and the one dispatch every operation goes through.

An :class:`Operation` maps strategy names to implementations (``{name: impl(problem)}``); the
problem is a small dataclass holding the validated call (function, arguments, options).
:func:`gradlab._derivatives._dispatch.dispatch` (a module above this one and
:mod:`gradlab._derivatives._autotune`, so neither imports the other's user) checks the name
against the registry, resolves ``"auto"`` and runs the implementation. ``jacobian``, ``hessian``,
``hvp`` and ``derivative`` each define one :class:`Operation`; autotune, the tests and the
``derivatives`` benchmark suite iterate over the same registries
(:data:`gradlab._derivatives.OPERATIONS`), so adding a strategy touches one place.

Forward-mode strategies run with grad mode on and report (as :class:`StrategyUnsupported`) any op
``f`` runs with grad mode off (checked on a function's first forward-mode call, then
remembered): forward mode would differentiate through ``torch.no_grad()`` blocks
and custom ``autograd.Function`` forwards, which reverse mode treats as constants or through their
own backward, so the results would depend on the strategy.

Forward-mode AD in PyTorch keeps its dual levels in process-global state: two threads running
``torch.func.jvp``/``jacfwd`` at once make each other fail ("Trying to create a dual Tensor for
forward AD but no level exists", torch 2.13). Two rules follow:

* Strategies that use forward mode run under one process-wide re-entrant lock
  (:data:`FORWARD_AD_LOCK`), which makes gradlab's own calls safe from any number of threads.
* A lock cannot cover forward-mode code *outside* gradlab (a user thread calling
  ``torch.func.jvp`` does not take it), so ``"auto"`` never chooses a forward-mode strategy, to
  run or to time, while another Python thread is alive (:func:`only_thread`): it runs the
  strategy's reverse-mode fallback instead (:meth:`Operation.auto_safe`; same values, only the
  speed differs). This is safe, not just unlikely to fail: when the calling thread is the only
  Python thread, no other thread can start one during the call except code the call itself runs
  (``f``). Naming a forward-mode strategy explicitly (or calling :func:`gradlab.jvp`) is the
  caller's decision to use forward mode and is not redirected.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from gradlab._derivatives._keys import function_key
from gradlab._validate import check_choice

__all__ = [
    "DEADLINE",
    "FORWARD_AD_LOCK",
    "Abandoned",
    "Operation",
    "Problem",
    "StrategyUnsupported",
    "check_deadline",
    "clock",
    "only_thread",
]

FORWARD_AD_LOCK = threading.RLock()

# Messages of errors raised by forward-mode AD on an op (or a custom autograd.Function) that has
# no forward-mode formula.
_FORWARD_AD_ERROR = re.compile(r"forward[- ]?(mode|AD)|jvp", re.IGNORECASE)


# The clock of every timing ``"auto"`` makes (a module attribute, so that tests can fake it).
clock = time.perf_counter
# When the candidate strategy being timed must be given up (``clock()`` units; inf: never).
DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar(
    "gradlab_deadline", default=math.inf
)


class Abandoned(Exception):
    """A timed candidate ran past its deadline: it is slower than the best so far, or over the
    measurement's budget (raised by :func:`check_deadline`)."""


def check_deadline(rest: float = 0.0) -> None:
    """Abandon the candidate being timed once it cannot end before its deadline.

    Called between the rows of the strategies that loop in Python (``"loop"``, nested
    ``"reverse"``), so a slow candidate stops as soon as it cannot win; outside a measurement the
    deadline is infinite and this costs a context-variable read.

    Args:
        rest: a lower bound on the time the candidate's remaining steps take (seconds; 0: none
            known). It stops now when that much more would run past the deadline: nested
            ``"reverse"`` passes the orders left times the last order's time (each order
            differentiates a graph that holds the previous one, so none is cheaper), which
            saves running one more order, the costliest so far, only to abandon after it.
    """
    deadline = DEADLINE.get()
    if deadline != math.inf and clock() + rest > deadline:
        raise Abandoned


def only_thread() -> bool:
    """Whether the calling thread is the only Python thread of the process.

    Counts the threads of :mod:`threading` and every thread state running Python code
    (``sys._current_frames``, which also sees threads started with ``_thread`` or from C).
    """
    return threading.active_count() == 1 and len(sys._current_frames()) == 1


class StrategyUnsupported(Exception):
    """A strategy cannot run this function (an op without a Taylor rule, without forward AD).

    Under ``"auto"`` the operation's fallback strategy runs instead; with the strategy named
    explicitly the public function reports it as a ``ValueError`` that names the fix.
    """


_NO_GRAD_CODE = (
    "f runs ops with grad mode off (torch.no_grad() or a custom autograd.Function), which "
    "forward-mode AD would differentiate through"
)
# (operation, function key) -> whether f ran under the probe without grad-mode-off ops. The probe
# (a TorchFunctionMode, a few microseconds per op) runs on a function's first forward-mode call
# only; a function that runs code without grad only on some inputs is not caught after that.
_PROBED: dict[tuple, bool] = {}
_PROBED_SIZE = 4096


def _remember(key: tuple, ok: bool) -> None:
    if len(_PROBED) >= _PROBED_SIZE:
        _PROBED.clear()
    _PROBED[key] = ok


class _GradModeProbe(TorchFunctionMode):
    """Reports an op that ``f`` runs with grad mode off (inside ``torch.no_grad()`` or a custom
    ``autograd.Function``'s forward). Forward-mode AD differentiates through such code while
    reverse mode treats it as a constant (or uses the Function's backward), so the strategies
    would disagree: the forward-mode strategies report it and ``"auto"`` falls back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not torch.is_grad_enabled():
            raise StrategyUnsupported(_NO_GRAD_CODE)
        return func(*args, **(kwargs or {}))


class Problem(Protocol):
    """What an implementation receives: the validated call of one operation."""

    @property
    def f(self) -> Callable[..., Any]: ...

    @property
    def keep(self) -> bool | None:
        """Whether the result may keep a graph (``None``: when grad mode is on)."""
        ...

    def key(self) -> tuple:
        """The input signature and options that can change the best strategy (hashable)."""
        ...

    def devices(self) -> Sequence[torch.device]:
        """Devices to synchronise around a timing and whose RNG state is watched."""
        ...


P = TypeVar("P", bound=Problem)


@dataclass(frozen=True, eq=False)
class Operation(Generic[P]):
    """The strategies of one operation and what ``"auto"`` needs to choose among them.

    Attributes:
        name: the public function's name (used in error messages and cache keys).
        strategies: the registry, ``{strategy name: implementation(problem) -> result}``.
        first: the strategy of an ``"auto"`` call whose heuristic is not known yet.
        heuristic: ``(problem, result of that first call) -> strategy``: the documented choice
            ``"auto"`` makes without measuring, kept unless a measured strategy wins clearly.
        fallback: under ``"auto"``, ``{strategy: other}`` to run when ``strategy`` raises
            :class:`StrategyUnsupported` (an op without a Taylor rule or a forward-mode formula).
        forward_ad: strategies that use forward-mode AD (run under :data:`FORWARD_AD_LOCK`);
            each must have a ``fallback`` that does not, which ``"auto"`` runs instead while other
            Python threads are alive (:meth:`auto_safe`).
        candidates: ``problem -> names`` worth timing (default: every strategy).
        steps: strategies that run in steps (rows, orders) and call :func:`check_deadline`
            between them, so that a timed run stops as soon as it cannot win: ``"auto"`` times
            them in a key's first call. The others run as one vectorised call, which cannot be
            stopped midway: ``"auto"`` tries them on the key's later calls instead, each such
            call running one strategy and returning its result.
        one_step: ``problem -> bool``, where the ``steps`` strategies have a single step for
            ``problem`` (a first derivative: one order): nothing to stop between, so they are
            tried on later calls like the vectorised ones (default: never).
        direct: derived, not passed: ``{strategy: implementation}`` for the strategies that
            :meth:`run_with_fallback` would only call (no forward mode, no fallback), which
            ``"auto"`` calls directly on a cache hit.
    """

    name: str
    strategies: Mapping[str, Callable[[P], Any]]
    first: str
    heuristic: Callable[[P, Any], str]
    fallback: Mapping[str, str] = field(default_factory=dict)
    forward_ad: frozenset[str] = frozenset()
    candidates: Callable[[P], Sequence[str]] | None = None
    steps: frozenset[str] = frozenset()
    one_step: Callable[[P], bool] | None = None
    direct: Mapping[str, Callable[[P], Any]] = field(init=False, repr=False)

    def stepped(self, problem: P) -> frozenset[str]:
        """The :attr:`steps` strategies that can stop midway on ``problem``."""
        if self.one_step is not None and self.one_step(problem):
            return frozenset()
        return self.steps

    def __post_init__(self) -> None:
        for name in self.forward_ad:
            if self.fallback.get(name, name) in self.forward_ad:
                raise ValueError(
                    f"Operation {self.name!r}: forward-mode strategy {name!r} needs a fallback "
                    f"that does not use forward mode"
                )
        # The strategies that :meth:`run_with_fallback` runs as their bare implementation (no
        # forward mode, so no lock or probe; no fallback, so nothing to catch): what "auto"
        # calls directly on a cache hit (``{name: implementation}``).
        direct = {
            n: impl
            for n, impl in self.strategies.items()
            if n not in self.forward_ad and n not in self.fallback
        }
        object.__setattr__(self, "direct", direct)

    def auto_safe(self, strategy: str) -> str:
        """``strategy``, or its reverse-mode fallback if it uses forward mode and another Python
        thread is alive (forward-AD levels are process-global; see the module docstring)."""
        if strategy in self.forward_ad and not only_thread():
            return self.fallback[strategy]
        return strategy

    @property
    def names(self) -> tuple[str, ...]:
        """Strategy names in registry order (without ``"auto"``)."""
        return tuple(self.strategies)

    def check(self, strategy: object) -> None:
        """Raise a ``ValueError`` listing the registry's names for an unknown ``strategy``."""
        if strategy != "auto" and strategy not in self.strategies:
            check_choice(self.name, "strategy", strategy, ("auto", *self.strategies))

    def candidate_names(self, problem: P) -> Sequence[str]:
        return self.names if self.candidates is None else self.candidates(problem)

    def probes(self, strategy: str, fkey: Any) -> bool:
        """Whether running ``strategy`` now runs the grad-mode probe (the first forward-mode run
        of the function): a run several times slower than the strategy's own cost."""
        return strategy in self.forward_ad and (self.name, fkey) not in _PROBED

    def run(self, strategy: str, problem: P, fkey: Any = None) -> Any:
        """Run one strategy (no fallback); forward-mode ones under the forward-AD lock.

        ``fkey``: ``function_key(problem.f)`` when the caller has it (``"auto"`` does).
        """
        impl = self.strategies[strategy]
        if strategy not in self.forward_ad:
            return impl(problem)
        grad_on = torch.is_grad_enabled()
        probed = (self.name, function_key(problem.f) if fkey is None else fkey)
        verdict = _PROBED.get(probed)
        if verdict is not None and not verdict:
            raise StrategyUnsupported(_NO_GRAD_CODE)
        with FORWARD_AD_LOCK:
            try:
                if verdict is None:  # the first forward-mode call of f: probed
                    with torch.enable_grad(), _GradModeProbe():
                        out = impl(problem)
                elif grad_on:
                    out = impl(problem)
                else:
                    with torch.enable_grad():
                        out = impl(problem)
            except StrategyUnsupported as exc:
                if str(exc) == _NO_GRAD_CODE:
                    _remember(probed, False)
                raise
            except (RuntimeError, NotImplementedError) as exc:
                if _FORWARD_AD_ERROR.search(str(exc)):
                    raise StrategyUnsupported(f"forward-mode AD failed: {exc}") from exc
                raise
        if verdict is None:
            _remember(probed, True)
        keep = problem.keep
        if grad_on if keep is None else keep:
            return out
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    def run_with_fallback(self, strategy: str, problem: P, fkey: Any = None) -> tuple[str, Any]:
        """:meth:`run`, then the fallback strategy if this one cannot handle the function.

        Returns:
            ``(strategy that ran, result)``.
        """
        try:
            return strategy, self.run(strategy, problem, fkey)
        except StrategyUnsupported:
            other = self.fallback.get(strategy)
            if other is None:
                raise
            return other, self.run(other, problem, fkey)
