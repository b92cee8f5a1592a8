"""Warnings and errors at the public boundary: BatchNorm, torch.compile, shapes, weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradlab import GraphError
from gradlab.penalties import (
    PathLengthPenalty,
    dragan_penalty,
    gradient_penalty,
    path_length_penalty,
    r1_penalty,
    r2_penalty,
)


def _bn_critic() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))


def test_batchnorm_in_train_mode_warns_once_naming_the_module():
    critic = _bn_critic()
    x = torch.randn(6, 3)
    with pytest.warns(
        UserWarning, match=r"gradient_penalty: the critic's module '1' \(BatchNorm1d\)"
    ):
        gradient_penalty(critic, x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_penalty(critic, x, x)  # once per module
        r1_penalty(critic, x)
        other = _bn_critic().eval()
        gradient_penalty(other, x, x)  # eval mode: no coupling, no warning
    with pytest.warns(UserWarning, match=r"LayerNorm"):
        r2_penalty(_bn_critic(), x)  # a new module warns again


def test_batchnorm_warning_names_nested_module():
    critic = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 1))
    with pytest.warns(UserWarning, match=r"'0\.1' \(BatchNorm1d\)"):
        r1_penalty(critic, torch.randn(5, 3))


def test_compiled_module_is_refused_with_the_fix():
    critic = nn.Linear(3, 1)
    compiled = torch.compile(critic)  # wraps only; compiling happens on the first call
    x = torch.randn(4, 3)
    with pytest.raises(GraphError, match=r"gradient_penalty: critic is compiled.*_orig_mod"):
        gradient_penalty(compiled, x, x)
    with pytest.raises(GraphError, match=r"double backward"):
        r1_penalty(compiled, x)


def test_compiled_function_and_submodule_and_inplace_compile_are_refused():
    x = torch.randn(4, 3)
    inner = nn.Linear(3, 1)
    with pytest.raises(GraphError, match=r"r1_penalty: critic is compiled"):
        r1_penalty(torch.compile(lambda t: inner(t)), x)
    with pytest.raises(GraphError, match=r"the critic's submodule '0' is compiled"):
        r1_penalty(nn.Sequential(torch.compile(nn.Linear(3, 3)), nn.Linear(3, 1)), x)
    module = nn.Linear(3, 1)
    module.compile()
    with pytest.raises(GraphError, match=r"dragan_penalty: critic is compiled"):
        dragan_penalty(module, x)


def test_uncompiled_critic_passes_the_compile_check_after_dynamo_is_loaded():
    torch.compile(nn.Linear(3, 1))  # loads torch._dynamo
    assert r1_penalty(nn.Linear(3, 1), torch.randn(4, 3)).shape == ()


def test_critic_output_without_batch_dimension():
    x = torch.randn(4, 3)
    critic = nn.Linear(3, 1)
    with pytest.raises(
        ValueError,
        match=r"gradient_penalty: the critic's output must be a tensor with the batch of 4 first",
    ):
        gradient_penalty(lambda t: critic(t).mean(), x, x)
    with pytest.raises(
        ValueError,
        match=r"with the batch of 4 first, shape \(4,\) or \(4, ...\), got tensor\(shape=\(1,\)",
    ):
        r1_penalty(lambda t: critic(t).sum(0), x)
    with pytest.raises(
        TypeError,
        match=r"r1_penalty: the critic's output must be a tensor with one score per sample, got \(",
    ):
        r1_penalty(lambda t: (critic(t),), x)


def test_mismatched_real_and_fake():
    critic = nn.Linear(3, 1)
    with pytest.raises(
        ValueError,
        match=r"gradient_penalty: fake must be of real's shape \(8, 3\), got tensor\(shape=\(6, 3",
    ):
        gradient_penalty(critic, torch.randn(8, 3), torch.randn(6, 3))
    with pytest.raises(
        ValueError, match=r"fake must be structured as real.*Pass both as tensors or both as tuples"
    ):
        gradient_penalty(critic, torch.randn(8, 3), (torch.randn(8, 3),))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -1.0}, "weight must be a finite number >= 0, got -1.0"),
        ({"weight": float("inf")}, "weight must be a finite number >= 0"),
        ({"center": -0.5}, "center must be a finite number >= 0"),
        ({"critic_kwargs": [1]}, "critic_kwargs must be a dict"),
    ],
    ids=["negative-weight", "inf-weight", "negative-center", "kwargs-not-dict"],
)
def test_bad_options(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gradient_penalty(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3), **kwargs)


def test_bad_critic_and_inputs():
    with pytest.raises(TypeError, match=r"r1_penalty: critic must be a callable"):
        r1_penalty("critic", torch.randn(4, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"r1_penalty: real must be a tensor or a non-empty tuple"):
        r1_penalty(nn.Linear(3, 1), "x")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"r1_penalty: real\[0\] must be a tensor, got \[1.0, 2.0, 3.0\]\. Pass"
    ):
        r1_penalty(nn.Linear(3, 1), [[1.0, 2.0, 3.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"labels through critic_kwargs"):
        r1_penalty(nn.Linear(3, 1), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize("penalty", ["gradient_penalty", "r1_penalty", "dragan_penalty"])
def test_batchnorm_warning_points_at_the_callers_line(penalty):
    import gradlab.penalties as P

    critic = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    fn = getattr(P, penalty)
    args = (critic, x, x.clone()) if penalty == "gradient_penalty" else (critic, x)
    with pytest.warns(UserWarning, match="training mode") as record:
        fn(*args)
    assert record[0].filename == __file__


def test_module_walk_sees_nested_shared_and_none_submodules():
    """The fast walk over _modules finds a BatchNorm however deep, through shared submodules and
    None entries, and terminates on a module that contains itself."""
    inner = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3)))
    critic = nn.Sequential(inner, inner, nn.Linear(3, 1))
    inner[0].register_module("empty", None)
    with pytest.warns(UserWarning, match=r"'0\.1\.0'"):
        gradient_penalty(critic, torch.randn(4, 3), torch.randn(4, 3))
    loop = nn.Sequential(nn.Linear(3, 1))
    loop[0].add_module("parent", loop)
    from gradlab.penalties._checks import check_critic

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_critic("gradient_penalty", loop)  # terminates, nothing to report


def _empty_batch_calls():
    critic = nn.Linear(3, 1)
    e = torch.zeros(0, 3)
    el = e.clone().requires_grad_(True)
    w = torch.zeros(0, 4, requires_grad=True)
    images = nn.Linear(4, 12)(w).view(0, 3, 2, 2)
    return {
        "gradient_penalty": lambda: gradient_penalty(critic, e, e.clone()),
        "gradient_penalty-same": lambda: gradient_penalty(critic, e, e),
        "gradient_penalty-tuple": lambda: gradient_penalty(critic, (e,), (e,)),
        "r1_penalty": lambda: r1_penalty(critic, e),
        "r1_penalty-outputs": lambda: r1_penalty(critic, el, outputs=critic(el)),
        "r1_penalty-fd": lambda: r1_penalty(critic, e, method="finite-difference"),
        "r2_penalty": lambda: r2_penalty(critic, e),
        "r2_penalty-fd": lambda: r2_penalty(critic, e, method="finite-difference"),
        "dragan_penalty": lambda: dragan_penalty(critic, e),
        "path_length_penalty": lambda: path_length_penalty(images, w, mean=0.0),
        "PathLengthPenalty": lambda: PathLengthPenalty()(images, w),
    }


@pytest.mark.parametrize("name", list(_empty_batch_calls()))
def test_empty_batch_is_a_value_error_naming_it(name):
    fn = name.split("-")[0]
    fn = "path_length_penalty" if fn == "PathLengthPenalty" else fn
    arg = {"r2_penalty": "fake", "path_length_penalty": "latents"}.get(fn, "real")
    with pytest.raises(
        ValueError,
        match=rf"{fn}: {arg} must be a non-empty batch .*got tensor\(shape=\(0, .*Skip the penalty",
    ):
        _empty_batch_calls()[name]()
