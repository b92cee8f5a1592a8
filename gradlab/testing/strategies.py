"""Hypothesis strategies for gradient property tests: tensors, shapes, dtypes, devices.

Hypothesis shrinks towards simple values, so it generates ``0.0``, ``1.0`` and arrays of repeated
values far more often than uniform sampling would. For gradients that matters: ``relu``, ``abs``
and ``sqrt`` are not differentiable at 0, ``max``/``sort`` have ties. Pass the kink points as
``avoid=(0.0,)`` (every element is then at least ``margin`` away from each of them) and
``unique=True`` where ties are a problem. Use these strategies with the hypothesis profiles of
:func:`gradlab.testing.register_hypothesis_profiles` (no deadline: the first call of a torch op
is slow).

Example:
    >>> from hypothesis import given
    >>> from gradlab.testing import strategies as gst
    >>> @given(gst.tensors(shape=(2, 3), avoid=(0.0,), margin=0.1, layout="strided"))
    ... def test_relu_away_from_zero(x):
    ...     assert x.shape == (2, 3) and not x.is_contiguous()
    ...     assert bool((x.abs() >= 0.1).all())
    >>> test_relu_away_from_zero()
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradlab._validate as v

__all__ = ["devices", "dtypes", "shapes", "tensors"]

_LAYOUTS = ("contiguous", "strided", "any")


def dtypes(
    *, include: Sequence[torch.dtype] = (torch.float32, torch.float64)
) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes to draw from (default float32 and float64).

    Example:
        >>> from hypothesis import given, settings
        >>> from gradlab.testing import strategies as gst
        >>> @settings(max_examples=5)
        ... @given(gst.dtypes())
        ... def test_dtype(dtype):
        ...     assert dtype in (torch.float32, torch.float64)
        >>> test_dtype()
    """
    include = tuple(include)
    if not include or not all(isinstance(d, torch.dtype) for d in include):
        raise ValueError(
            v.message(
                "dtypes",
                "include",
                "a non-empty sequence of torch dtypes",
                include,
                "Pass e.g. include=(torch.float32, torch.float64)",
            )
        )
    return st.sampled_from(include)


def devices(*, cuda: bool = True) -> st.SearchStrategy[torch.device]:
    """``cpu``, plus ``cuda`` when a GPU is available (and ``cuda=True``).

    Example:
        >>> from hypothesis import given, settings
        >>> from gradlab.testing import strategies as gst
        >>> @settings(max_examples=5)
        ... @given(gst.devices())
        ... def test_device(device):
        ...     assert torch.zeros(1, device=device).device.type in ("cpu", "cuda")
        >>> test_device()
    """
    options = [torch.device("cpu")]
    if cuda and torch.cuda.is_available():
        options.append(torch.device("cuda"))
    return st.sampled_from(options)


def shapes(
    *, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 5
) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes with ``min_dims..max_dims`` dimensions of size ``min_side..max_side``.

    Keep them small: every element of a checked tensor costs a few function evaluations.

    Example:
        >>> from hypothesis import given, settings
        >>> from gradlab.testing import strategies as gst
        >>> @settings(max_examples=5)
        ... @given(gst.shapes(min_dims=2, max_dims=2, max_side=3))
        ... def test_shape(shape):
        ...     assert len(shape) == 2 and all(1 <= s <= 3 for s in shape)
        >>> test_shape()
    """
    min_dims = v.check_nonnegative("shapes", "min_dims", min_dims, integer=True)
    min_side = v.check_nonnegative("shapes", "min_side", min_side, integer=True)
    v.check_int("shapes", "max_dims", max_dims, minimum=min_dims, fix="Pass max_dims >= min_dims")
    v.check_int("shapes", "max_side", max_side, minimum=min_side, fix="Pass max_side >= min_side")
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def _strategy(value: Any) -> st.SearchStrategy[Any]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _push_away(
    a: np.ndarray, avoid: tuple[float, ...], margin: float, lo: float, hi: float
) -> np.ndarray:
    """Move every element closer than ``margin`` to an avoided point to ``point +- margin``."""
    step = margin * 1.01  # a little extra so the float32 cast stays outside the margin
    for p in avoid:
        close = np.abs(a - p) < margin
        if close.any():
            up = np.where(a >= p, 1.0, -1.0)
            up = np.where(p + up * step > hi, -1.0, np.where(p + up * step < lo, 1.0, up))
            a = np.where(close, p + up * step, a)
    return a


def tensors(
    *,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] = (3,),
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] = torch.float64,
    device: str | torch.device | st.SearchStrategy[torch.device] = "cpu",
    min_value: float = -2.0,
    max_value: float = 2.0,
    avoid: Sequence[float] = (),
    margin: float = 1e-3,
    unique: bool = False,
    layout: str = "contiguous",
) -> st.SearchStrategy[torch.Tensor]:
    """Floating tensors with bounded elements, optionally kept away from kink points.

    Args:
        shape: a shape or a strategy of shapes (e.g. :func:`shapes`).
        dtype: a dtype or a strategy of dtypes (e.g. :func:`dtypes`).
        device: a device or a strategy of devices (e.g. :func:`devices`).
        min_value, max_value: element bounds (inclusive), finite, ``min_value < max_value``.
        avoid: points (e.g. ``(0.0,)`` for ``relu``) that every element stays at least
            ``margin`` away from; elements drawn closer are moved to ``point +- margin`` (towards
            the side they were on, unless that leaves the bounds), so no examples are rejected.
            Points must be at least ``2 * margin`` apart and leave room inside the bounds.
        margin: distance kept from the ``avoid`` points; make it larger than the
            finite-difference step of the check (5e-6 float64, 5e-3 float32 by default).
        unique: all elements distinct (no ties for ``max``, ``sort``, ``median``).
        layout: ``"contiguous"``; ``"strided"``: a non-contiguous view (every other element of
            the last dimension of a larger tensor, or a transposed tensor) whenever the shape has
            a dimension with more than one element; ``"any"``: either.

    Returns:
        A strategy of tensors (``requires_grad=False``).

    Example:
        >>> from hypothesis import given, settings
        >>> from gradlab.testing import strategies as gst
        >>> @settings(max_examples=5)
        ... @given(gst.tensors(shape=(4,), dtype=torch.float32, min_value=-1, max_value=1))
        ... def test_bounded(x):
        ...     assert x.dtype == torch.float32 and x.shape == (4,)
        ...     assert bool((x.abs() <= 1).all())
        >>> test_bounded()
    """
    avoid = tuple(v.check_float("tensors", f"avoid[{i}]", p) for i, p in enumerate(avoid))
    min_value = v.check_float("tensors", "min_value", min_value)
    max_value = v.check_float(
        "tensors",
        "max_value",
        max_value,
        low=min_value,
        low_open=True,
        fix="Pass max_value > min_value",
    )
    margin = v.check_positive("tensors", "margin", margin)
    v.check_choice("tensors", "layout", layout, _LAYOUTS)
    spaced = sorted(avoid)
    if any(b - a < 2 * margin for a, b in itertools.pairwise(spaced)):
        raise ValueError(
            f"tensors: avoid points {spaced} are closer than 2 * margin = {2 * margin}; "
            "use a smaller margin"
        )
    if any(p - 1.01 * margin < min_value and p + 1.01 * margin > max_value for p in avoid):
        raise ValueError(
            f"tensors: the interval [{min_value}, {max_value}] has no room at distance "
            f"{margin} from the avoid points {avoid}; widen the bounds or shrink the margin"
        )
    elements = st.floats(
        min_value=float(min_value),
        max_value=float(max_value),
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
    )
    layouts = {"contiguous": ["contiguous"], "strided": ["slice", "transpose"]}
    kinds = layouts.get(layout, ["contiguous", "slice", "transpose"])

    @st.composite
    def draw_tensor(draw: st.DrawFn) -> torch.Tensor:
        shp = tuple(draw(_strategy(shape)))
        dt = draw(_strategy(dtype))
        dev = torch.device(draw(_strategy(device)))
        kind = draw(st.sampled_from(kinds))
        if math.prod(shp) <= 1 or len(shp) == 0:
            kind = "contiguous"
        if kind == "transpose" and sum(s > 1 for s in shp) < 2 and len(shp) >= 1:
            kind = "slice"  # a permutation of one non-trivial dim is still contiguous
        base_shape = {
            "contiguous": shp,
            "slice": (*shp[:-1], 2 * shp[-1]) if shp else shp,
            "transpose": tuple(reversed(shp)),
        }[kind]
        arr = draw(hnp.arrays(np.float64, base_shape, elements=elements, unique=unique))
        arr = _push_away(arr, avoid, margin, min_value, max_value)
        t = torch.as_tensor(arr, dtype=dt, device=dev)
        if kind == "slice":
            t = t[..., ::2]
        elif kind == "transpose":
            t = t.permute(*reversed(range(t.dim())))
        return t

    return draw_tensor()
