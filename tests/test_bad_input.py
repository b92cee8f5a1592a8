"""Bad input, table-driven: for each public function, a bad value for each argument.

Every row asserts the error type and that the message follows the one template of
:mod:`gradlab._validate`::

    "{fn}: {name} must be ..., got {value!r}. {fix}"

(the function the user called, the argument, the value received as ``describe(value)`` writes it,
and a fix after it). To cover a new function or argument, add one :func:`row` to ``ROWS`` (or
to a list of your own area, concatenated below): ``call`` receives the bad value and calls the
public function with it in place of the argument ``name``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import gradlab.finetune as ft
from gradlab._validate import describe
from gradlab.testing import check_gradients, numerical_jacobian

F64 = torch.float64


@dataclass(frozen=True)
class Row:
    fn: str  # the public function's name, as the message starts
    name: str  # the argument's name, as the message names it
    value: Any  # the bad value
    call: Callable[[Any], object]  # calls the public function with ``value`` for ``name``
    error: type[Exception]  # TypeError (wrong type) or ValueError (right type, bad value)
    got: str | None = None  # the "got ..." text, if not describe(value)

    @property
    def id(self) -> str:
        return f"{self.fn}-{self.name}-{describe(self.value)[:30]}"


def row(
    fn: str,
    name: str,
    value: Any,
    call: Callable[[Any], object],
    error: type[Exception],
    got: str | None = None,
) -> Row:
    return Row(fn, name, value, call, error, got)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([model[2].weight], lr=0.1)


def _unfreezing(**kwargs: Any) -> object:
    net = _net()
    args = {"model": net, "optimizer": _opt(net), "stages": ["1"], **kwargs}
    return ft.GradualUnfreezing(
        args.pop("model"), args.pop("optimizer"), args.pop("stages"), **args
    )


X = torch.tensor([0.5, -1.0, 2.0], dtype=F64)


def _check(**kwargs: Any) -> object:
    return check_gradients(torch.sin, X, **kwargs)


def _jac(**kwargs: Any) -> object:
    return numerical_jacobian(torch.sin, X, **kwargs)


FINETUNE = [
    row("freeze", "model", [1.0], lambda v: ft.freeze(v), TypeError),
    row("freeze", "batchnorm", "evaluate", lambda v: ft.freeze(_net(), batchnorm=v), ValueError),
    row("freeze", "batchnorm", 3, lambda v: ft.freeze(_net(), batchnorm=v), ValueError),
    row("freeze", "each target", 3.5, lambda v: ft.freeze(_net(), v), TypeError),
    row("freeze", "a type target", int, lambda v: ft.freeze(_net(), v), TypeError),
    row("unfreeze", "model", "net", lambda v: ft.unfreeze(v), TypeError),
    row("unfreeze", "each target", None, lambda v: ft.unfreeze(_net(), v), TypeError),
    row("frozen", "model", 1, lambda v: ft.frozen(v).__enter__(), TypeError),
    row(
        "frozen",
        "batchnorm",
        "off",
        lambda v: ft.frozen(_net(), batchnorm=v).__enter__(),
        ValueError,
    ),
    row("trainable_parameters", "model", None, lambda v: ft.trainable_parameters(v), TypeError),
    row("param_groups", "model", {}, lambda v: ft.param_groups(v, 0.1), TypeError),
    row("param_groups", "lr", "x", lambda v: ft.param_groups(_net(), v), TypeError),
    row("param_groups", "lr", -1.0, lambda v: ft.param_groups(_net(), v), ValueError),
    row("param_groups", "lr", float("nan"), lambda v: ft.param_groups(_net(), v), ValueError),
    row(
        "param_groups",
        "weight_decay",
        None,
        lambda v: ft.param_groups(_net(), 0.1, weight_decay=v),
        TypeError,
    ),
    row(
        "param_groups",
        "weight_decay",
        -0.1,
        lambda v: ft.param_groups(_net(), 0.1, weight_decay=v),
        ValueError,
    ),
    row(
        "param_groups",
        "layer_decay",
        0.0,
        lambda v: ft.param_groups(_net(), 0.1, layer_decay=v),
        ValueError,
    ),
    row(
        "param_groups",
        "layer_decay",
        1.5,
        lambda v: ft.param_groups(_net(), 0.1, layer_decay=v),
        ValueError,
    ),
    row(
        "param_groups",
        "layer_decay",
        "half",
        lambda v: ft.param_groups(_net(), 0.1, layer_decay=v),
        TypeError,
    ),
    row(
        "param_groups",
        "layers",
        3,
        lambda v: ft.param_groups(_net(), 0.1, layer_decay=0.5, layers=v),
        TypeError,
    ),
    row("param_groups", "groups", 3, lambda v: ft.param_groups(_net(), 0.1, groups=v), TypeError),
    row(
        "param_groups",
        "groups['0']",
        -2.0,
        lambda v: ft.param_groups(_net(), 0.1, groups={"0": v}),
        ValueError,
    ),
    row(
        "param_groups",
        "no_weight_decay",
        "bias",
        lambda v: ft.param_groups(_net(), 0.1, no_weight_decay=v),
        TypeError,
    ),
    row(
        "param_groups",
        "no_weight_decay",
        3,
        lambda v: ft.param_groups(_net(), 0.1, no_weight_decay=v),
        TypeError,
    ),
    row(
        "param_groups",
        "each pattern of no_weight_decay",
        3,
        lambda v: ft.param_groups(_net(), 0.1, no_weight_decay=[v]),
        TypeError,
    ),
    row(
        "replace_module", "model", 0, lambda v: ft.replace_module(v, "0", nn.Identity()), TypeError
    ),
    row(
        "replace_module",
        "name",
        0,
        lambda v: ft.replace_module(_net(), v, nn.Identity()),
        TypeError,
    ),
    row(
        "replace_module",
        "name",
        "",
        lambda v: ft.replace_module(_net(), v, nn.Identity()),
        ValueError,
    ),
    row(
        "replace_module",
        "new_module",
        torch.relu,
        lambda v: ft.replace_module(_net(), "0", v),
        TypeError,
    ),
    row("parameter_summary", "model", "net", lambda v: ft.parameter_summary(v), TypeError),
    row(
        "parameter_summary",
        "max_depth",
        0,
        lambda v: ft.parameter_summary(_net(), max_depth=v),
        ValueError,
    ),
    row(
        "parameter_summary",
        "max_depth",
        1.5,
        lambda v: ft.parameter_summary(_net(), max_depth=v),
        TypeError,
    ),
    row("GradualUnfreezing", "model", None, lambda v: _unfreezing(model=v), TypeError),
    row("GradualUnfreezing", "optimizer", "sgd", lambda v: _unfreezing(optimizer=v), TypeError),
    row("GradualUnfreezing", "stages", "1", lambda v: _unfreezing(stages=v), TypeError),
    row("GradualUnfreezing", "stages", [], lambda v: _unfreezing(stages=v), ValueError),
    row("GradualUnfreezing", "milestones", [0], lambda v: _unfreezing(milestones=v), ValueError),
    row("GradualUnfreezing", "lr", "fast", lambda v: _unfreezing(lr=v), TypeError),
    row("GradualUnfreezing", "lr", [0.1, 0.2], lambda v: _unfreezing(lr=v), ValueError),
    row("GradualUnfreezing", "layer_decay", 2.0, lambda v: _unfreezing(layer_decay=v), ValueError),
    row("GradualUnfreezing", "scheduler", "cosine", lambda v: _unfreezing(scheduler=v), TypeError),
    row("GradualUnfreezing", "batchnorm", "none", lambda v: _unfreezing(batchnorm=v), ValueError),
    row(
        "FrozenBatchNorm.from_batchnorm",
        "bn",
        nn.Linear(2, 2),
        lambda v: ft.FrozenBatchNorm.from_batchnorm(v),
        TypeError,
    ),
    row("FrozenBatchNorm1d", "num_features", 0, lambda v: ft.FrozenBatchNorm1d(v), ValueError),
    row("FrozenBatchNorm1d", "num_features", "4", lambda v: ft.FrozenBatchNorm1d(v), TypeError),
    row("FrozenBatchNorm1d", "eps", -1.0, lambda v: ft.FrozenBatchNorm1d(4, v), ValueError),
]

TESTING = [
    row("check_gradients", "fn", 3, lambda v: check_gradients(v, X), TypeError),
    row("check_gradients", "inputs[0]", [1.0], lambda v: check_gradients(torch.sin, v), TypeError),
    row(
        "check_gradients",
        "inputs[0]",
        torch.arange(3),
        lambda v: check_gradients(torch.sin, v),
        TypeError,
    ),
    row(
        "check_gradients",
        "inputs[0]",
        torch.ones(2, dtype=torch.float16),
        lambda v: check_gradients(torch.sin, v),
        TypeError,
    ),
    row(
        "check_gradients",
        "inputs[0]",
        torch.tensor([1.0, float("nan")], dtype=F64),
        lambda v: check_gradients(torch.sin, v),
        ValueError,
    ),
    row(
        "check_gradients",
        "inputs[0]",
        torch.zeros(0, dtype=F64),
        lambda v: check_gradients(torch.sin, v),
        ValueError,
    ),
    row("check_gradients", "inputs", (), lambda v: check_gradients(torch.sin, *v), TypeError),
    row("check_gradients", "order", 3, lambda v: _check(order=v), ValueError),
    row("check_gradients", "order", "1", lambda v: _check(order=v), ValueError),
    row("check_gradients", "mode", "quick", lambda v: _check(mode=v), ValueError),
    row("check_gradients", "method", "forward", lambda v: _check(method=v), ValueError),
    row("check_gradients", "directions", "uniform", lambda v: _check(directions=v), ValueError),
    row("check_gradients", "kinks", "ignore", lambda v: _check(kinks=v), ValueError),
    row("check_gradients", "atol", "x", lambda v: _check(atol=v), TypeError),
    row("check_gradients", "atol", -1.0, lambda v: _check(atol=v), ValueError),
    row("check_gradients", "rtol", float("inf"), lambda v: _check(rtol=v), ValueError),
    row("check_gradients", "eps", 0.0, lambda v: _check(eps=v), ValueError),
    row("check_gradients", "eps", "small", lambda v: _check(eps=v), TypeError),
    row("check_gradients", "probes", 0, lambda v: _check(probes=v), ValueError),
    row("check_gradients", "probes", 2.5, lambda v: _check(probes=v), TypeError),
    row("check_gradients", "seed", "0", lambda v: _check(seed=v), TypeError),
    row("check_gradients", "forward_ad", 1, lambda v: _check(forward_ad=v), TypeError),
    row("check_gradients", "nondet_tol", -1e-9, lambda v: _check(nondet_tol=v), ValueError),
    row("check_gradients", "nondet_tol", None, lambda v: _check(nondet_tol=v), TypeError),
    row(
        "check_gradients",
        "fn's return value",
        2.0,
        lambda v: check_gradients(lambda x: v, X),
        TypeError,
    ),
    row("numerical_jacobian", "fn", None, lambda v: numerical_jacobian(v, X), TypeError),
    row(
        "numerical_jacobian",
        "inputs[0]",
        1.0,
        lambda v: numerical_jacobian(torch.sin, v),
        TypeError,
    ),
    row("numerical_jacobian", "method", "central2", lambda v: _jac(method=v), ValueError),
    row("numerical_jacobian", "eps", -1.0, lambda v: _jac(eps=v), ValueError),
    row("numerical_jacobian", "chunk_size", 0, lambda v: _jac(chunk_size=v), ValueError),
    row("numerical_jacobian", "chunk_size", "4", lambda v: _jac(chunk_size=v), TypeError),
]

#: Other areas append their rows here (or concatenate their own list).
ROWS: list[Row] = FINETUNE + TESTING


def _template(r: Row) -> re.Pattern[str]:
    got = re.escape(r.got if r.got is not None else describe(r.value))
    return re.compile(
        rf"^{re.escape(r.fn)}: {re.escape(r.name)} must be .+, got {got}\. \S.*$", re.DOTALL
    )


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_names_function_argument_value_and_fix(r: Row) -> None:
    with pytest.raises(r.error) as info:
        r.call(r.value)
    assert type(info.value) is r.error, f"{type(info.value).__name__}: {info.value}"
    assert _template(r).match(str(info.value)), str(info.value)


def test_strategies_bad_input() -> None:
    gst = pytest.importorskip("gradlab.testing.strategies")
    rows = [
        row("tensors", "margin", 0.0, lambda v: gst.tensors(margin=v), ValueError),
        row("tensors", "layout", "channels_last", lambda v: gst.tensors(layout=v), ValueError),
        row("tensors", "max_value", -5.0, lambda v: gst.tensors(max_value=v), ValueError),
        row("tensors", "min_value", "a", lambda v: gst.tensors(min_value=v), TypeError),
        row("shapes", "min_dims", -1, lambda v: gst.shapes(min_dims=v), ValueError),
        row("shapes", "max_side", 0, lambda v: gst.shapes(min_side=1, max_side=v), ValueError),
        row("dtypes", "include", (), lambda v: gst.dtypes(include=v), ValueError),
    ]
    for r in rows:
        with pytest.raises(r.error) as info:
            r.call(r.value)
        assert _template(r).match(str(info.value)), str(info.value)
