"""The PENALTIES registry, and the proof that a new penalty needs no other file: a toy penalty
written here (a front end over the core, as a penalty module would be) is registered inside the
test and passes every shared check (gradcheck, twin-free call, no side effects, AMP, FSDP
refusal, bad input, DDP on 2 gloo processes)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import gradlab.penalties as P
from gradlab._typing import TensorFn, TensorOrTensors
from gradlab._validate import check_nonnegative
from gradlab.penalties import PENALTIES, PenaltyEntry, register_penalty
from gradlab.penalties._checks import (
    check_critic,
    check_critic_kwargs,
    check_nonempty,
    check_pair,
    check_scaler,
)
from gradlab.penalties._core import exact_penalty, make_spec
from tests.penalties import _shared
from tests.penalties._ddp_check import check_ddp
from tests.penalties._reference import loop_norms


def midpoint_penalty(
    critic: TensorFn,
    real: TensorOrTensors,
    fake: TensorOrTensors,
    *,
    weight: float = 1.0,
    critic_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """A toy: ``weight * mean_i (||grad D(m_i)|| - 1)^2`` at the midpoints ``m = (x + x~)/2``."""
    fn = "midpoint_penalty"
    spec = make_spec(fn, check_nonnegative(fn, "weight", weight), 1.0)
    r, f = check_pair(fn, real, fake)
    check_nonempty(fn, "real", r)
    kwargs = check_critic_kwargs(fn, critic_kwargs)
    scaler = check_scaler(fn, scaler)
    check_critic(fn, critic)
    mid = tuple(torch.lerp(a.detach(), b.detach(), 0.5).requires_grad_(True) for a, b in zip(r, f))
    return exact_penalty(spec, critic, mid, kwargs, scaler)[0]


TOY = PenaltyEntry("midpoint", midpoint_penalty, inputs=("real", "fake"), zero_centred=False)


@pytest.fixture
def toy():
    register_penalty(TOY)
    try:
        yield TOY
    finally:
        del PENALTIES[TOY.name]


def test_the_toy_is_its_formula_written_out():
    critic = _shared.mlp()
    real, fake = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    want = 2.0 * ((loop_norms(critic, ((real + fake) / 2,)) - 1) ** 2).mean()
    torch.testing.assert_close(
        midpoint_penalty(critic, real, fake, weight=2.0), want, rtol=1e-12, atol=0
    )


def test_a_registered_toy_passes_every_shared_check(toy, tmp_path: Path):
    assert PENALTIES["midpoint"] is toy
    (case,) = _shared.cases([toy])
    entry, method = case.values
    _shared.check_gradcheck(entry, method)
    _shared.check_twin(entry, method)  # no twin: nothing to compare
    _shared.check_no_side_effects(entry, method)
    _shared.check_int_seed(entry, method)
    _shared.check_power_of_two_scale_is_exact(entry)
    _shared.check_autocast_training_step(entry, torch.device("cpu"))
    _shared.check_fsdp_refused(entry)
    rows = _shared.bad_inputs(entry, method)
    assert {r.id for r in rows} >= {"empty-batch", "critic-str", "weight-negative", "scaler-str"}
    for row in rows:
        _shared.check_bad_input(entry, method, *row.values)
    check_ddp([entry], tmp_path)


def test_every_critic_penalty_is_registered_with_its_twin():
    got = {name: (e.fn, e.with_norms, e.inputs, e.zero_centred) for name, e in PENALTIES.items()}
    assert got == {
        "wgan-gp": (P.gradient_penalty, P.gradient_penalty_and_norms, ("real", "fake"), False),
        "r1": (P.r1_penalty, P.r1_penalty_and_norms, ("real",), True),
        "r2": (P.r2_penalty, P.r2_penalty_and_norms, ("fake",), True),
        "dragan": (P.dragan_penalty, P.dragan_penalty_and_norms, ("real",), False),
    }
    for entry in PENALTIES.values():
        assert entry.fn.__name__ in P.__all__
        assert entry.with_norms is not None and entry.with_norms.__name__ in P.__all__
        assert entry.with_norms.__name__ == entry.fn.__name__ + "_and_norms"
    assert PENALTIES["r1"].methods == ("exact", "finite-difference")
    assert PENALTIES["wgan-gp"].random and not PENALTIES["r1"].random


def test_registering_a_taken_name_or_a_bad_entry_is_refused():
    with pytest.raises(ValueError, match=r"register_penalty: name must be new, got 'r1'"):
        register_penalty(PenaltyEntry("r1", midpoint_penalty, ("real",), False))
    with pytest.raises(TypeError, match=r"register_penalty: entry must be a PenaltyEntry"):
        register_penalty(midpoint_penalty)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"PenaltyEntry: inputs must be"):
        PenaltyEntry("x", midpoint_penalty, ("images",), False)
    with pytest.raises(ValueError, match=r"PenaltyEntry: methods must contain 'exact'"):
        PenaltyEntry("x", midpoint_penalty, ("real",), False, methods=("finite-difference",))
    assert "x" not in PENALTIES


def test_penalty_docstrings_are_real_text():
    """Each penalty's docstring is the text in its source (no runtime templating), with the
    formula and the paper."""
    import inspect

    for entry in PENALTIES.values():
        doc = inspect.getdoc(entry.fn) or ""
        assert ".. math::" in doc and "References:" in doc and "Example:" in doc
        assert "{fd}" not in doc and "{args}" not in doc
        module_source = inspect.getsource(inspect.getmodule(entry.fn))
        assert "__doc__" not in module_source
        assert doc.splitlines()[0] in inspect.getsource(entry.fn)
