"""The registry of critic penalties, and the ``*_and_norms`` twins built from their penalty.

:data:`PENALTIES` maps a short name (``"r1"``) to a :class:`PenaltyEntry`: the public function,
its ``*_and_norms`` twin, the sample arguments it takes after the critic, whether it is
zero-centred and which methods it offers. Each penalty module registers its own entry with
:func:`register_penalty`, so adding a penalty touches its module, the subpackage's
``__init__.py`` (which imports it, and so registers it) and its test; the cross-cutting tests
(gradcheck, AMP, DDP, FSDP refusal, bad input) and the benchmark loop over the registry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import torch

from gradlab.penalties._core import PenaltyWithNorms

__all__ = ["PENALTIES", "PenaltyEntry", "bind", "register_penalty", "twin_of"]

P = ParamSpec("P")
R = TypeVar("R")

_SAMPLE_ARGUMENTS = ("real", "fake")


@dataclass(frozen=True)
class PenaltyEntry:
    """One critic penalty: what the tests and the benchmark need to call it generically.

    Attributes:
        name: the registry key, e.g. ``"wgan-gp"``.
        fn: the public function ``fn(critic, *samples, **options) -> Tensor`` (a scalar).
        inputs: the names of its sample arguments after ``critic``, in order: ``("real",)``,
            ``("fake",)`` or ``("real", "fake")``.
        zero_centred: whether its default target norm is 0 (R1, R2), so that it has a
            first-order finite-difference estimator in principle.
        with_norms: its ``*_and_norms`` twin (same signature, returns a
            :class:`PenaltyWithNorms`), or ``None``.
        methods: the values its ``method=`` accepts (``("exact",)`` when it has no such
            argument).
        random: whether the exact method draws random numbers (then it takes ``generator=``).

    Example:
        >>> from gradlab.penalties import PENALTIES
        >>> sorted(PENALTIES)
        ['dragan', 'r1', 'r2', 'wgan-gp']
        >>> entry = PENALTIES["r1"]
        >>> entry.inputs, entry.zero_centred, entry.methods
        (('real',), True, ('exact', 'finite-difference'))
        >>> critic, real, fake = torch.nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3)
        >>> [e.fn(critic, *e.samples(real, fake)).shape for e in PENALTIES.values()]
        [torch.Size([]), torch.Size([]), torch.Size([]), torch.Size([])]
    """

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    zero_centred: bool
    with_norms: Callable[..., PenaltyWithNorms] | None = None
    methods: tuple[str, ...] = ("exact",)
    random: bool = False

    def __post_init__(self) -> None:
        if not self.inputs or any(n not in _SAMPLE_ARGUMENTS for n in self.inputs):
            raise ValueError(
                f"PenaltyEntry: inputs must be a non-empty tuple of {_SAMPLE_ARGUMENTS}, got "
                f"{self.inputs!r}. Name the sample arguments the penalty takes after critic"
            )
        if "exact" not in self.methods:
            raise ValueError(
                f"PenaltyEntry: methods must contain 'exact', got {self.methods!r}. Every "
                "penalty has an exact method"
            )

    def samples(self, real: Any, fake: Any) -> tuple[Any, ...]:
        """The sample arguments of ``fn`` picked from ``real`` and ``fake``."""
        return tuple(real if n == "real" else fake for n in self.inputs)


#: Every critic penalty of gradlab, by short name (path length, a generator regularizer with its
#: own calling convention, is not a critic penalty and is not listed).
PENALTIES: dict[str, PenaltyEntry] = {}


def register_penalty(entry: PenaltyEntry) -> PenaltyEntry:
    """Add ``entry`` to :data:`PENALTIES` (a name may be registered once) and return it.

    A penalty module calls this once, at its end, for its own function; the subpackage's
    ``__init__.py`` imports the module (which registers it) and exports the function.

    Example:
        >>> from gradlab.penalties import PENALTIES, PenaltyEntry, r1_penalty, register_penalty
        >>> def l2_at_real(critic, real, *, weight=1.0):  # a toy: R1 with another weight
        ...     return r1_penalty(critic, real, gamma=2 * weight)
        >>> _ = register_penalty(PenaltyEntry("toy", l2_at_real, ("real",), zero_centred=True))
        >>> "toy" in PENALTIES
        True
        >>> del PENALTIES["toy"]  # (this example leaves the registry as it was)
    """
    if not isinstance(entry, PenaltyEntry):
        raise TypeError(
            f"register_penalty: entry must be a PenaltyEntry, got {entry!r}. Build one with "
            "PenaltyEntry(name=..., fn=..., inputs=..., zero_centred=...)"
        )
    if entry.name in PENALTIES:
        raise ValueError(
            f"register_penalty: name must be new, got {entry.name!r}, already registered for "
            f"{PENALTIES[entry.name].fn.__name__}. Pick another name"
        )
    PENALTIES[entry.name] = entry
    return entry


def twin_of(
    primary: Callable[P, Any], *, rename: dict[str, str] | None = None
) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Decorator: the decorated function takes ``primary``'s parameters.

    The decorated function is written ``def f(*args, **kwargs) -> ...`` with its own real
    docstring, and gets ``primary``'s signature (with its own return annotation, and the
    parameters in ``rename`` renamed) for :func:`inspect.signature`, :func:`help`, Sphinx and the
    type checker (through the ``ParamSpec``), so the keyword list is written once, on the
    penalty: the ``*_and_norms`` twins take their penalty's, and
    :func:`~gradlab.penalties.r2_penalty` takes :func:`~gradlab.penalties.r1_penalty`'s with
    ``real`` renamed ``fake``.
    """
    signature = inspect.signature(primary)
    if rename:
        signature = signature.replace(
            parameters=[
                p.replace(name=rename.get(p.name, p.name)) for p in signature.parameters.values()
            ]
        )

    def decorate(twin: Callable[..., R]) -> Callable[P, R]:
        returns = inspect.signature(twin).return_annotation
        twin.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
        return cast(Callable[P, R], twin)

    return decorate


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def bind(
    twin: str, primary: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """The arguments of a call of ``twin`` (which has ``primary``'s signature), defaults
    applied, in ``primary``'s parameter order: what the core takes positionally."""
    try:
        bound = _signature(primary).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{twin}: {e}. See help({twin}) for its arguments") from None
    bound.apply_defaults()
    return tuple(bound.arguments.values())
