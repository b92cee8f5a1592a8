"""Tests of gradlab.testing.strategies (gradlab/testing/strategies.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradlab.testing import strategies as gst

_FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FIXTURE
@given(data=st.data())
def test_tensors_respect_shape_dtype_device_and_bounds(device, data) -> None:
    shape = data.draw(gst.shapes(min_dims=0, max_dims=3, max_side=4))
    dtype = data.draw(gst.dtypes())
    x = data.draw(gst.tensors(shape=shape, dtype=dtype, device=device, min_value=-0.5, max_value=2))
    assert x.shape == shape and x.dtype == dtype and x.device.type == device.type
    assert bool(((x >= -0.5) & (x <= 2)).all())
    assert not x.requires_grad


@given(
    x=gst.tensors(
        shape=gst.shapes(max_side=6),
        dtype=gst.dtypes(),
        avoid=(0.0, 1.0),
        margin=0.05,
        min_value=-1,
        max_value=1,
    )
)
def test_avoid_keeps_every_element_a_margin_away(x) -> None:
    assert bool(((x - 0.0).abs() >= 0.05).all()) and bool(((x - 1.0).abs() >= 0.05).all())
    assert bool(((x >= -1) & (x <= 1)).all())


def test_hypothesis_zeros_are_pushed_away() -> None:
    # Hypothesis starts from all-zero arrays; with avoid=(0.0,) none survive.
    seen = []

    @settings(max_examples=30, derandomize=True)
    @given(gst.tensors(shape=(4,), avoid=(0.0,), margin=1e-3))
    def collect(x):
        seen.append(x)

    collect()
    assert all(bool((x.abs() >= 1e-3).all()) for x in seen)


@given(x=gst.tensors(shape=gst.shapes(min_dims=1, max_dims=3, min_side=2), layout="strided"))
def test_strided_layout_is_not_contiguous(x) -> None:
    assert not x.is_contiguous()


@given(x=gst.tensors(shape=(6,), unique=True, min_value=0, max_value=1))
def test_unique_has_no_ties(x) -> None:
    assert x.unique().numel() == 6


def test_devices_lists_cpu_and_cuda_only_when_available() -> None:
    seen = set()

    @settings(max_examples=20)
    @given(gst.devices())
    def collect(d):
        seen.add(d.type)

    collect()
    assert "cpu" in seen
    assert ("cuda" in seen) <= torch.cuda.is_available()


@given(shape=gst.shapes(min_dims=1, max_dims=2, min_side=2, max_side=3))
def test_shapes_bounds(shape) -> None:
    assert 1 <= len(shape) <= 2 and all(2 <= s <= 3 for s in shape)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_value": 1.0, "max_value": 1.0}, "max_value must be a finite number > 1, got 1.0"),
        ({"margin": 0.0}, "margin must be a finite number > 0"),
        ({"layout": "channels_last"}, "layout must be one of"),
        ({"avoid": (0.0, 0.001), "margin": 0.01}, "avoid points .* are closer than 2 \\* margin"),
        ({"avoid": (0.0,), "margin": 5.0}, "the interval .* has no room"),
    ],
)
def test_tensors_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"tensors: {match}"):
        gst.tensors(**kwargs)


def test_shapes_and_dtypes_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shapes: max_dims must be an int >= 3, got 1"):
        gst.shapes(min_dims=3, max_dims=1)
    with pytest.raises(
        ValueError, match=r"dtypes: include must be a non-empty sequence of torch dtypes, got \(\)"
    ):
        gst.dtypes(include=())
