"""Argument checks shared by every gradlab subpackage: one order, one message template.

Every helper takes ``(fn, name, value, ...)``: the public function the user called, the argument's
name as the user wrote it (``"tol"``, ``"params[2]"``), and the value received. On success it
returns the value (converted where the check says so: :func:`check_generator` turns an int seed
into a :class:`torch.Generator`, :func:`check_float` an int into a float); on failure it raises

- :class:`TypeError` for a value of the wrong type (``tol="x"``),
- :class:`ValueError` for a value of the right type outside its domain (``tol=-1.0``),

with one message template::

    "{fn}: {name} must be {requirement}, got {value!r}. {fix}"

e.g. ``check_gradients: tol must be a finite number > 0, got -1.0. Pass a positive tolerance
such as 1e-6``. ``{value!r}`` is shortened for large values: a tensor reads
``tensor(shape=(3, 4), dtype=torch.float32, device=cpu)`` (see :func:`describe`). ``fix`` says
what to pass instead; every helper has a default fix and takes ``fix=`` to say something more
specific.

For a domain check that none of these helpers covers (critic shapes, parameter sets), build the
message with :func:`message` (same template) and raise it yourself, so every error still reads
the same::

    raise ValueError(message(fn, "real", "the same shape as fake (8, 3)", real, "Resize one."))

The helpers are cheap enough for hot paths: the accepted path is one or two ``type``/``isinstance``
tests and comparisons (no string is built unless the check fails).

Example:
    >>> import gradlab._validate as v
    >>> v.check_positive("f", "tol", 1e-6)
    1e-06
    >>> v.check_positive("f", "n", 3, integer=True)
    3
    >>> try:
    ...     v.check_choice("f", "mode", "fats", ("fast", "full"))
    ... except ValueError as e:
    ...     print(e)
    f: mode must be one of 'fast', 'full', got 'fats'. Did you mean 'fast'?
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar, overload

import torch

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_generator",
    "check_int",
    "check_nonnegative",
    "check_positive",
    "check_probability",
    "check_tensor",
    "check_type",
    "describe",
    "message",
]

T = TypeVar("T")

_MAX_REPR = 80


def describe(value: Any) -> str:
    """``repr(value)``, shortened for the ``got ...`` part of a message.

    A tensor is described by shape, dtype and device (its values would flood the message); any
    other repr longer than 80 characters is cut with ``...``.

    Example:
        >>> import torch
        >>> import gradlab._validate as v
        >>> v.describe(torch.zeros(3, 4))
        'tensor(shape=(3, 4), dtype=torch.float32, device=cpu)'
        >>> v.describe("x")
        "'x'"
    """
    if isinstance(value, torch.Tensor):
        layout = "" if value.layout == torch.strided else f", layout={value.layout}"
        return (
            f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device}"
            f"{layout})"
        )
    if isinstance(value, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in value[:4]):
        items = [describe(x) for x in value[:2]] + (["..."] if len(value) > 2 else [])
        left, right = (
            ("[", "]") if isinstance(value, list) else ("(", ",)" if len(value) == 1 else ")")
        )
        return left + ", ".join(items) + right
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return text


def message(fn: str, name: str, requirement: str, value: Any, fix: str = "") -> str:
    """The one message template: ``"{fn}: {name} must be {requirement}, got {value!r}. {fix}"``.

    ``value`` goes through :func:`describe`. ``fix`` is appended as its own sentence (a trailing
    period is added if missing); an empty ``fix`` leaves the message ending after ``got ...``.

    Example:
        >>> import gradlab._validate as v
        >>> v.message("f", "n", "an int >= 1", 0, "Pass n=1 or more")
        'f: n must be an int >= 1, got 0. Pass n=1 or more.'
    """
    text = f"{fn}: {name} must be {requirement}, got {describe(value)}."
    if fix:
        text += " " + fix if fix.endswith((".", "!", "?", ")")) else " " + fix + "."
    return text


def _type_name(types: type | tuple[type, ...]) -> str:
    if isinstance(types, type):
        types = (types,)
    names = []
    for t in types:
        if t is type(None):
            names.append("None")
        elif t.__module__ in ("builtins",):
            names.append(t.__qualname__)
        else:
            names.append(
                f"{t.__module__}.{t.__qualname__}".replace("torch.nn.modules.", "torch.nn.")
            )
    return " or ".join(names)


@overload
def check_type(
    fn: str, name: str, value: object, types: type[T], *, what: str | None = ..., fix: str = ...
) -> T: ...


@overload
def check_type(
    fn: str,
    name: str,
    value: T,
    types: tuple[type, ...],
    *,
    what: str | None = ...,
    fix: str = ...,
) -> T: ...


def check_type(
    fn: str,
    name: str,
    value: Any,
    types: type | tuple[type, ...],
    *,
    what: str | None = None,
    fix: str = "",
) -> Any:
    """``value`` if it is an instance of ``types``, else a :class:`TypeError`.

    Args:
        fn: the public function's name.
        name: the argument's name.
        value: what the user passed.
        types: a type or a tuple of types (``type(None)`` to allow ``None``).
        what: the requirement in words (default: ``"a"`` and the type names).
        fix: what to pass instead (default: ``"Pass <what>"``).
    """
    if isinstance(value, types):
        return value
    requirement = what or f"a {_type_name(types)}"
    raise TypeError(message(fn, name, requirement, value, fix or f"Pass {requirement}"))


def check_callable(fn: str, name: str, value: T, *, what: str = "a callable", fix: str = "") -> T:
    """``value`` if it is callable, else a :class:`TypeError` (``what`` names the signature)."""
    if callable(value):
        return value
    raise TypeError(message(fn, name, what, value, fix or f"Pass {what}"))


def check_bool(fn: str, name: str, value: Any, *, fix: str = "") -> bool:
    """``value`` if it is exactly ``True`` or ``False`` (not 0/1, not a tensor), else TypeError."""
    if value is True or value is False:
        return value
    raise TypeError(message(fn, name, "True or False", value, fix or "Pass a bool"))


def check_choice(fn: str, name: str, value: T, choices: Sequence[Any], *, fix: str = "") -> T:
    """``value`` if it is one of ``choices``, else a :class:`ValueError` listing them.

    The default fix suggests the closest string choice (``difflib``) when there is one. Choices
    are compared by ``==`` together with their type, so ``1`` does not pass for ``True`` and an
    unhashable value (a list) is refused rather than raising from inside the check.
    """
    for c in choices:
        if value is c or (type(value) is type(c) and value == c):
            return value
    listed = ", ".join(repr(c) for c in choices)
    if not fix:
        strs = [c for c in choices if isinstance(c, str)]
        close = difflib.get_close_matches(value, strs, n=1) if isinstance(value, str) else []
        fix = f"Did you mean {close[0]!r}?" if close else f"Pass one of {listed}"
    raise ValueError(message(fn, name, f"one of {listed}", value, fix))


def check_int(
    fn: str,
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    fix: str = "",
) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (bounds optional, inclusive).

    A bool is refused (``True`` is not a count); any other integral (``numpy.int64``, a 0-d integer
    tensor) is accepted through ``operator.index``. TypeError for a non-integer, ValueError for an
    integer out of range. (:func:`check_float`'s check with integers: one numeric check.)
    """
    result: int = _check_number(fn, name, value, _Number(True, minimum, maximum), fix)
    return result


def check_float(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    finite: bool = True,
    fix: str = "",
) -> float:
    """``value`` as a float, optionally finite and in a (half-)open or closed interval.

    Ints and floats (and numpy scalars) are accepted, bools and tensors are not (pass
    ``t.item()``). TypeError for a non-number, ValueError for NaN, an infinity (unless
    ``finite=False``) or a number outside ``low``/``high`` (``low_open``/``high_open`` make that end
    exclusive).
    """
    number = _Number(False, low, high, low_open, high_open, finite)
    result: float = _check_number(fn, name, value, number, fix)
    return result


class _Number(NamedTuple):
    """What :func:`_check_number` accepts: an int or a float, and the interval it must lie in."""

    integer: bool
    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True  # (ints are always finite)

    def requirement(self) -> str:
        """What the message says a value must be: ``"an int >= 1"``, ``"a finite number > 0"``."""
        low, high = self.low, self.high
        if self.integer:
            if low is not None and high is not None:
                return f"an int in [{low}, {high}]"
            if low is not None:
                return f"an int >= {low}"
            if high is not None:
                return f"an int <= {high}"
            return "an int"
        kind = "a finite number" if self.finite else "a number"
        if low is not None and high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"{kind} in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low:g}"
        if high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high:g}"
        return kind


def _check_number(fn: str, name: str, value: Any, number: _Number, fix: str) -> Any:
    """The one numeric check behind :func:`check_int` and :func:`check_float`: ``value``
    converted (``__index__`` for an int, ``float()`` for a float; bools refused, and tensors for
    floats), TypeError if it cannot be, ValueError outside ``number``'s interval (or NaN, or an
    infinity when finite)."""
    t = type(value)
    if number.integer:
        if t is not int:
            if t is bool or isinstance(value, bool) or not hasattr(t, "__index__"):
                raise TypeError(_number_message(fn, name, value, number, fix))
            value = value.__index__()
    elif t is not float:
        if t is bool or isinstance(value, (bool, torch.Tensor)) or not hasattr(t, "__float__"):
            raise TypeError(_number_message(fn, name, value, number, fix))
        value = float(value)
    low, high = number.low, number.high
    if (
        (number.finite and not number.integer and not math.isfinite(value))
        or value != value  # NaN fails every interval
        or (low is not None and (value <= low if number.low_open else value < low))
        or (high is not None and (value >= high if number.high_open else value > high))
    ):
        raise ValueError(_number_message(fn, name, value, number, fix))
    return value


def _number_message(fn: str, name: str, value: Any, number: _Number, fix: str) -> str:
    requirement = number.requirement()
    return message(fn, name, requirement, value, fix or f"Pass {requirement}")


def check_positive(fn: str, name: str, value: Any, *, integer: bool = False, fix: str = "") -> Any:
    """A finite float > 0, or with ``integer=True`` an int >= 1 (counts, sizes, steps)."""
    if integer:
        return check_int(fn, name, value, minimum=1, fix=fix)
    if type(value) is float and 0.0 < value < math.inf:  # the hot path
        return value
    return check_float(fn, name, value, low=0.0, low_open=True, fix=fix)


def check_nonnegative(
    fn: str, name: str, value: Any, *, integer: bool = False, fix: str = ""
) -> Any:
    """A finite float >= 0, or with ``integer=True`` an int >= 0 (weights, decays, counts)."""
    if integer:
        return check_int(fn, name, value, minimum=0, fix=fix)
    if type(value) is float and 0.0 <= value < math.inf:  # the hot path
        return value
    return check_float(fn, name, value, low=0.0, fix=fix)


def check_probability(
    fn: str,
    name: str,
    value: Any,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> float:
    """A float in ``[0, 1]`` (``low_open``/``high_open`` exclude 0 or 1, e.g. Adam's betas)."""
    return check_float(
        fn, name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open, fix=fix
    )


def check_tensor(
    fn: str,
    name: str,
    value: Any,
    *,
    floating: bool = False,
    ndim: int | None = None,
    min_ndim: int | None = None,
    nonempty: bool = False,
    finite: bool = False,
    fix: str = "",
) -> torch.Tensor:
    """``value`` if it is a tensor meeting every requested property.

    Args:
        floating: require a floating-point (or complex) dtype.
        ndim / min_ndim: require exactly / at least this many dimensions.
        nonempty: refuse a tensor with 0 elements.
        finite: refuse NaN or infinite entries. This reads the values (a device synchronisation and
            a pass over the data): do not ask for it on hot paths.

    Raises:
        TypeError: not a tensor, or not floating point when ``floating``.
        ValueError: wrong number of dimensions, empty, or non-finite.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(message(fn, name, "a torch.Tensor", value, fix or "Pass a tensor"))
    if floating and not (value.is_floating_point() or value.is_complex()):
        raise TypeError(
            message(
                fn,
                name,
                "a floating-point tensor",
                value,
                fix or f"Convert it, e.g. {name}.double() or {name}.float()",
            )
        )
    if ndim is not None and value.ndim != ndim:
        raise ValueError(
            message(
                fn,
                name,
                f"a {ndim}-d tensor",
                value,
                fix or "Reshape it (view, unsqueeze, flatten)",
            )
        )
    if min_ndim is not None and value.ndim < min_ndim:
        raise ValueError(
            message(
                fn,
                name,
                f"a tensor with at least {min_ndim} dimension(s)",
                value,
                fix or "Add the missing dimensions, e.g. with unsqueeze(0)",
            )
        )
    if nonempty and value.numel() == 0:
        raise ValueError(
            message(
                fn,
                name,
                "a non-empty tensor",
                value,
                fix or "Pass a tensor with at least one element",
            )
        )
    if finite and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(
            message(
                fn,
                name,
                "a tensor of finite values (no NaN or inf)",
                value,
                fix or f"Check where {name} comes from, or test at finite points",
            )
        )
    return value


def check_generator(
    fn: str, name: str, value: Any, *, device: torch.device | str | None = None
) -> torch.Generator | None:
    """One rule for random number generators: ``None``, an int seed or a :class:`torch.Generator`.

    - ``None`` stays ``None`` (the caller uses torch's global RNG);
    - an int seed becomes a fresh ``torch.Generator(device=device).manual_seed(seed)`` (``device``
      defaults to the CPU), so the same seed gives the same draws on every call;
    - a ``torch.Generator`` is returned as it is, after checking that it lives on ``device``'s
      type (a CPU generator cannot draw CUDA tensors) when ``device`` is given.

    Raises:
        TypeError: anything else (a str, a float, a bool).
        ValueError: a negative seed, or a generator on another device type than ``device``.
    """
    if value is None:
        return None
    if isinstance(value, torch.Generator):
        if device is not None:
            want = torch.device(device).type
            if value.device.type != want:
                raise ValueError(
                    message(
                        fn,
                        name,
                        f"a torch.Generator on {want}",
                        value,
                        f"Pass torch.Generator(device={want!r}) or an int seed",
                    )
                )
        return value
    if type(value) is not bool and hasattr(type(value), "__index__"):
        seed = value.__index__()
        if seed < 0:
            raise ValueError(
                message(
                    fn,
                    name,
                    "a seed >= 0, a torch.Generator or None",
                    value,
                    "Pass a non-negative int seed",
                )
            )
        gen = torch.Generator(device="cpu" if device is None else device)
        return gen.manual_seed(seed)
    raise TypeError(
        message(
            fn,
            name,
            "a torch.Generator, an int seed or None",
            value,
            "Pass e.g. generator=0 or generator=torch.Generator().manual_seed(0)",
        )
    )
