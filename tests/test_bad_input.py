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


def _penalty_rows() -> list[Row]:
    """For every registered critic penalty (gradlab.penalties.PENALTIES), a bad value for each
    argument of its signature (a new penalty gets its rows from the registry), then the other
    public functions of gradlab.penalties."""
    import inspect

    import gradlab.penalties as gp

    def sample() -> torch.Tensor:
        return torch.randn(4, 3, dtype=F64)

    def critic() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(3, 1).double()

    def caller(entry: gp.PenaltyEntry, name: str) -> Callable[[Any], object]:
        def call(v: Any) -> object:
            args = {"critic": critic(), "real": sample(), "fake": sample()}
            if name in ("real", "fake"):  # both: a pair must match before it is judged
                args["real"] = args["fake"] = v
            elif name in args:
                args[name] = v
            kwargs = {} if name in args else {name: v}
            samples = entry.samples(args["real"], args["fake"])
            return entry.fn(args["critic"], *samples, **kwargs)

        return call

    rows = []
    for entry in gp.PENALTIES.values():
        fn, call = entry.fn.__name__, lambda name, e=entry: caller(e, name)
        arg = entry.inputs[0]
        rows += [
            row(fn, "critic", "critic", call("critic"), TypeError),
            row(fn, arg, "x", call(arg), TypeError),
            row(fn, arg, torch.zeros(0, 3, dtype=F64), call(arg), ValueError),
            row(fn, arg, torch.ones(4, 3, dtype=torch.long), call(arg), TypeError),
            row(fn, "critic_kwargs", [1], call("critic_kwargs"), TypeError),
            row(fn, "scaler", "x", call("scaler"), TypeError),
        ]
        for name, p in inspect.signature(entry.fn).parameters.items():
            if isinstance(p.default, float):
                rows += [
                    row(fn, name, "x", call(name), TypeError),
                    row(fn, name, -1.0, call(name), ValueError),
                    row(fn, name, float("nan"), call(name), ValueError),
                ]
        if entry.random:
            rows.append(row(fn, "generator", "abc", call("generator"), TypeError))
        else:  # the exact method draws nothing
            rows.append(row(fn, "generator", "abc", call("generator"), ValueError))
        if len(entry.methods) > 1:
            rows.append(row(fn, "method", "fd", call("method"), ValueError))
            rows += [
                row(
                    fn,
                    "sigma",
                    "x",
                    lambda v, f=entry.fn: f(
                        critic(), sample(), sigma=v, method="finite-difference"
                    ),
                    TypeError,
                ),
                row(
                    fn,
                    "sigma",
                    0.0,
                    lambda v, f=entry.fn: f(
                        critic(), sample(), sigma=v, method="finite-difference"
                    ),
                    ValueError,
                ),
                row(
                    fn,
                    "generator",
                    "abc",
                    lambda v, f=entry.fn: f(
                        critic(), sample(), generator=v, method="finite-difference"
                    ),
                    TypeError,
                ),
            ]
    lazy = gp.LazyRegularizer(every=4)
    adam = "LazyRegularizer.adam_hyperparameters"
    w = torch.randn(2, 4, requires_grad=True)
    images = nn.Linear(4, 12)(w).view(2, 3, 2, 2)
    rows += [
        row("LazyRegularizer", "every", 0, lambda v: gp.LazyRegularizer(every=v), ValueError),
        row("LazyRegularizer", "every", 2.5, lambda v: gp.LazyRegularizer(every=v), TypeError),
        row("LazyRegularizer.is_due", "step", -1, lambda v: lazy.is_due(v), ValueError),
        row(adam, "lr", -1.0, lambda v: lazy.adam_hyperparameters(lr=v), ValueError),
        row(adam, "lr", "x", lambda v: lazy.adam_hyperparameters(lr=v), TypeError),
        row(adam, "betas", None, lambda v: lazy.adam_hyperparameters(0.1, v), TypeError),
        row(adam, "betas", (0.9,), lambda v: lazy.adam_hyperparameters(0.1, v), ValueError),
        row(adam, "betas[1]", 1.5, lambda v: lazy.adam_hyperparameters(0.1, (0.9, v)), ValueError),
        row(adam, "betas[0]", "x", lambda v: lazy.adam_hyperparameters(0.1, (v, 0.9)), TypeError),
        row(
            "interpolate",
            "generator",
            "abc",
            lambda v: gp.interpolate(X, X, generator=v),
            TypeError,
        ),
        row("interpolate", "fake", torch.zeros(2), lambda v: gp.interpolate(X, v), ValueError),
        row(
            "path_length_penalty",
            "decay",
            1.5,
            lambda v: gp.path_length_penalty(images, w, mean=0.0, decay=v),
            ValueError,
        ),
        row(
            "path_length_penalty",
            "generator",
            "abc",
            lambda v: gp.path_length_penalty(images, w, mean=0.0, generator=v),
            TypeError,
        ),
        row(
            "input_gradient_norms",
            "outputs",
            torch.zeros(()),
            lambda v: gp.input_gradient_norms(v, w),
            ValueError,
        ),
    ]
    return rows


PENALTIES = _penalty_rows()

#: Other areas append their rows here (or concatenate their own list).
ROWS: list[Row] = FINETUNE + TESTING + PENALTIES


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
