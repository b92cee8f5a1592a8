"""Unit tests of gradlab._validate: each helper accepts what it should, refuses the rest with the
one template ``"{fn}: {name} must be ..., got {value!r}. {fix}"`` and the right error type."""

from __future__ import annotations

import math
import re

import pytest
import torch

import gradlab._validate as v

TEMPLATE = re.compile(r"^f: arg must be .+, got .+\. \S.*$", re.DOTALL)


def _raises(exc: type[Exception], call, got: str) -> str:
    with pytest.raises(exc) as info:
        call()
    text = str(info.value)
    assert TEMPLATE.match(text), text
    assert f", got {got}" in text, text
    return text


def test_message_template() -> None:
    assert (
        v.message("f", "n", "an int >= 1", 0, "Pass 1")
        == "f: n must be an int >= 1, got 0. Pass 1."
    )
    assert v.message("f", "n", "x", "a", "Fix it.") == "f: n must be x, got 'a'. Fix it."
    assert v.message("f", "n", "x", None) == "f: n must be x, got None."


def test_describe_shortens() -> None:
    assert v.describe(torch.zeros(2, 3, dtype=torch.float64)) == (
        "tensor(shape=(2, 3), dtype=torch.float64, device=cpu)"
    )
    params = [torch.zeros(2), torch.zeros(3), torch.zeros(4)]
    assert v.describe(params) == (
        "[tensor(shape=(2,), dtype=torch.float32, device=cpu), "
        "tensor(shape=(3,), dtype=torch.float32, device=cpu), ...]"
    )
    assert v.describe((torch.zeros(1),)) == "(tensor(shape=(1,), dtype=torch.float32, device=cpu),)"
    long = "x" * 500
    assert len(v.describe(long)) == 80 and v.describe(long).endswith("...")

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert v.describe(Broken()) == "<Broken object>"


def test_check_type() -> None:
    assert v.check_type("f", "arg", 3, int) == 3
    assert v.check_type("f", "arg", None, (int, type(None))) is None
    text = _raises(TypeError, lambda: v.check_type("f", "arg", "x", (int, type(None))), "'x'")
    assert "must be a int or None" in text
    text = _raises(TypeError, lambda: v.check_type("f", "arg", 1, torch.nn.Module), "1")
    assert "torch.nn.module.Module" in text
    _raises(TypeError, lambda: v.check_type("f", "arg", 1, str, what="a name", fix="Say it"), "1")


def test_check_callable() -> None:
    assert v.check_callable("f", "arg", len) is len
    _raises(TypeError, lambda: v.check_callable("f", "arg", 3), "3")


def test_check_bool() -> None:
    assert v.check_bool("f", "arg", True) is True
    assert v.check_bool("f", "arg", False) is False
    for bad, got in [(1, "1"), (None, "None"), ("yes", "'yes'")]:
        _raises(TypeError, lambda bad=bad: v.check_bool("f", "arg", bad), got)
    _raises(TypeError, lambda: v.check_bool("f", "arg", torch.tensor(True)), "tensor(shape=()")


def test_check_choice() -> None:
    assert v.check_choice("f", "arg", "fast", ("fast", "full")) == "fast"
    assert v.check_choice("f", "arg", None, ("eval", None)) is None
    text = _raises(
        ValueError, lambda: v.check_choice("f", "arg", "fats", ("fast", "full")), "'fats'"
    )
    assert "one of 'fast', 'full'" in text and "Did you mean 'fast'?" in text
    text = _raises(ValueError, lambda: v.check_choice("f", "arg", "zzz", ("fast", "full")), "'zzz'")
    assert text.endswith("Pass one of 'fast', 'full'.")
    # a 1 is not True, and an unhashable value is refused cleanly
    _raises(ValueError, lambda: v.check_choice("f", "arg", 1, (True, False)), "1")
    _raises(ValueError, lambda: v.check_choice("f", "arg", ["fast"], ("fast",)), "['fast']")


def test_check_int() -> None:
    assert v.check_int("f", "arg", 5) == 5
    assert v.check_int("f", "arg", torch.tensor(4)) == 4  # integral, via __index__
    assert type(v.check_int("f", "arg", torch.tensor(4))) is int
    assert v.check_int("f", "arg", 0, minimum=0, maximum=0) == 0
    _raises(TypeError, lambda: v.check_int("f", "arg", True), "True")
    _raises(TypeError, lambda: v.check_int("f", "arg", 2.0), "2.0")
    _raises(TypeError, lambda: v.check_int("f", "arg", "3"), "'3'")
    text = _raises(ValueError, lambda: v.check_int("f", "arg", 0, minimum=1), "0")
    assert "an int >= 1" in text
    text = _raises(ValueError, lambda: v.check_int("f", "arg", 9, minimum=1, maximum=8), "9")
    assert "an int in [1, 8]" in text
    _raises(ValueError, lambda: v.check_int("f", "arg", 9, maximum=8), "9")
    # ints share check_float's numeric check but are never converted to float: no overflow, no
    # rounding, and the bounds print as ints
    assert v.check_int("f", "arg", 10**400, minimum=0) == 10**400
    text = _raises(ValueError, lambda: v.check_int("f", "arg", 2**60, maximum=2**53), str(2**60))
    assert f"an int <= {2**53}" in text


def test_check_positive_and_nonnegative() -> None:
    assert v.check_positive("f", "arg", 1e-6) == 1e-6
    assert v.check_positive("f", "arg", 2) == 2.0 and type(v.check_positive("f", "arg", 2)) is float
    assert v.check_positive("f", "arg", 2, integer=True) == 2
    assert v.check_nonnegative("f", "arg", 0.0) == 0.0
    assert v.check_nonnegative("f", "arg", 0, integer=True) == 0
    for bad, got in [(0.0, "0.0"), (-1.0, "-1.0"), (math.inf, "inf"), (math.nan, "nan")]:
        text = _raises(ValueError, lambda bad=bad: v.check_positive("f", "arg", bad), got)
        assert "a finite number > 0," in text
    _raises(ValueError, lambda: v.check_nonnegative("f", "arg", -1e-9), "-1e-09")
    _raises(ValueError, lambda: v.check_nonnegative("f", "arg", math.nan), "nan")
    _raises(ValueError, lambda: v.check_positive("f", "arg", 0, integer=True), "0")
    _raises(ValueError, lambda: v.check_nonnegative("f", "arg", -1, integer=True), "-1")
    for bad, got in [("x", "'x'"), (None, "None"), (True, "True"), ([1.0], "[1.0]")]:
        _raises(TypeError, lambda bad=bad: v.check_positive("f", "arg", bad), got)
        _raises(TypeError, lambda bad=bad: v.check_nonnegative("f", "arg", bad), got)
    _raises(TypeError, lambda: v.check_positive("f", "arg", torch.tensor(1.0)), "tensor(shape=()")
    _raises(TypeError, lambda: v.check_positive("f", "arg", 1.5, integer=True), "1.5")


def test_check_float_ranges() -> None:
    assert v.check_float("f", "arg", math.inf, finite=False) == math.inf
    _raises(ValueError, lambda: v.check_float("f", "arg", math.nan, finite=False), "nan")
    assert v.check_float("f", "arg", 1.0, low=0.0, high=1.0) == 1.0
    text = _raises(
        ValueError, lambda: v.check_float("f", "arg", 1.0, low=0.0, high=1.0, high_open=True), "1.0"
    )
    assert "in [0, 1)" in text
    _raises(
        ValueError, lambda: v.check_float("f", "arg", 0.0, low=0.0, high=1.0, low_open=True), "0.0"
    )
    text = _raises(ValueError, lambda: v.check_float("f", "arg", 5.0, high=1.0), "5.0")
    assert "<= 1," in text
    assert v.check_probability("f", "arg", 0) == 0.0
    assert v.check_probability("f", "arg", 0.9, high_open=True) == 0.9
    _raises(ValueError, lambda: v.check_probability("f", "arg", 1.5), "1.5")
    _raises(ValueError, lambda: v.check_probability("f", "arg", 1.0, high_open=True), "1.0")
    _raises(TypeError, lambda: v.check_probability("f", "arg", None), "None")


def test_check_tensor() -> None:
    x = torch.zeros(2, 3)
    assert v.check_tensor("f", "arg", x, floating=True, ndim=2, nonempty=True, finite=True) is x
    assert (
        v.check_tensor("f", "arg", torch.zeros(2, dtype=torch.complex64), floating=True) is not None
    )
    _raises(TypeError, lambda: v.check_tensor("f", "arg", [1.0]), "[1.0]")
    _raises(
        TypeError,
        lambda: v.check_tensor("f", "arg", torch.zeros(2, dtype=torch.long), floating=True),
        "tensor(shape=(2,), dtype=torch.int64, device=cpu)",
    )
    _raises(ValueError, lambda: v.check_tensor("f", "arg", x, ndim=1), "tensor(shape=(2, 3)")
    _raises(
        ValueError,
        lambda: v.check_tensor("f", "arg", torch.zeros(3), min_ndim=2),
        "tensor(shape=(3,)",
    )
    _raises(
        ValueError,
        lambda: v.check_tensor("f", "arg", torch.zeros(0), nonempty=True),
        "tensor(shape=(0,)",
    )
    _raises(
        ValueError,
        lambda: v.check_tensor("f", "arg", torch.tensor([1.0, math.nan]), finite=True),
        "tensor(shape=(2,)",
    )
    # finite=False (the default) never reads the values
    assert v.check_tensor("f", "arg", torch.tensor([math.inf])) is not None


def test_check_generator(device: str) -> None:
    assert v.check_generator("f", "arg", None) is None
    g = torch.Generator(device=device)
    assert v.check_generator("f", "arg", g, device=device) is g
    a = v.check_generator("f", "arg", 7, device=device)
    b = v.check_generator("f", "arg", 7, device=torch.device(device))
    assert isinstance(a, torch.Generator) and a.device.type == torch.device(device).type
    # an int seed is a fresh generator seeded the same way each time: the same draws
    assert torch.equal(
        torch.rand(5, generator=a, device=device), torch.rand(5, generator=b, device=device)
    )
    assert v.check_generator("f", "arg", 3).device.type == "cpu"
    for bad, got in [("abc", "'abc'"), (1.5, "1.5"), (True, "True")]:
        text = _raises(TypeError, lambda bad=bad: v.check_generator("f", "arg", bad), got)
        assert "a torch.Generator, an int seed or None" in text
    _raises(ValueError, lambda: v.check_generator("f", "arg", -1), "-1")
    if torch.device(device).type != "cpu":
        _raises(
            ValueError,
            lambda: v.check_generator("f", "arg", torch.Generator(), device=device),
            "<torch._C.Generator",
        )


def test_generator_mismatch_cpu_vs_meta() -> None:
    # a device check that needs no GPU: a CPU generator for a "cuda" device is refused
    text = _raises(
        ValueError,
        lambda: v.check_generator("f", "arg", torch.Generator(), device="cuda"),
        "<torch._C.Generator",
    )
    assert "torch.Generator(device='cuda')" in text


def test_accepted_values_are_not_copied() -> None:
    params = [torch.zeros(1)]
    assert v.check_type("f", "arg", params, list) is params
