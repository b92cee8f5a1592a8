"""The checks every registered critic penalty must pass, written once against a PenaltyEntry.

The cross-cutting test modules (test_gradcheck, test_amp, test_bad_input, test_fsdp, test_ddp)
parametrize these over ``gradlab.penalties.PENALTIES``; test_registry runs them on a toy penalty
registered in the test, to show that a new penalty is picked up with no other file touched.
Random draws use int seeds (``generator=0``), so each call is a deterministic function of the
critic's parameters.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gradlab import GraphError
from gradlab.penalties import PENALTIES, PenaltyEntry, PenaltyWithNorms

FD_SIGMA = 0.1


def cases(entries: Iterable[PenaltyEntry] | None = None) -> list[Any]:
    """``pytest.param(entry, method)`` for every method of every entry, with readable ids."""
    entries = PENALTIES.values() if entries is None else entries
    return [
        pytest.param(e, m, id=e.name if m == "exact" else f"{e.name}-{m}")
        for e in entries
        for m in e.methods
    ]


def options(entry: PenaltyEntry, method: str, seed: int = 0) -> dict[str, Any]:
    """The keyword arguments that make a call deterministic for ``method``."""
    kw: dict[str, Any] = {}
    if method != "exact":
        kw.update(method=method, sigma=FD_SIGMA)
    if entry.random or method != "exact":
        kw["generator"] = seed  # an int seed, as every penalty accepts
    return kw


def call(
    entry: PenaltyEntry,
    critic: Callable[..., Any],
    real: Any,
    fake: Any,
    method: str = "exact",
    seed: int = 0,
    **extra: Any,
) -> torch.Tensor:
    """``entry.fn`` on the samples it takes, deterministic for ``method``."""
    kw = {**options(entry, method, seed), **extra}
    return entry.fn(critic, *entry.samples(real, fake), **kw)


def mlp(d: int = 3, h: int = 4, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1)).to(dtype)


def fn_name(entry: PenaltyEntry) -> str:
    return entry.fn.__name__


# --- autograd -----------------------------------------------------------------------------


def check_gradcheck(entry: PenaltyEntry, method: str) -> None:
    """float64 gradcheck of the penalty w.r.t. the critic's parameters (a double backward
    through the critic against central finite differences of the penalty)."""
    module = mlp()
    real = torch.randn(3, 3, dtype=torch.float64)
    fake = torch.randn(3, 3, dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        def critic(*a: Any, **k: Any) -> Any:
            return functional_call(module, dict(zip(names, ps)), a, k)

        return call(entry, critic, real, fake, method)

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def check_twin(entry: PenaltyEntry, method: str) -> None:
    """The ``*_and_norms`` twin has the penalty's signature and returns the same penalty (bit
    for bit, same draws) with detached per-sample norms, shape (B,)."""
    if entry.with_norms is None:
        return
    fn_sig = inspect.signature(entry.fn)
    twin_sig = inspect.signature(entry.with_norms)
    assert list(twin_sig.parameters.values()) == list(fn_sig.parameters.values())
    critic = mlp()
    real, fake = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    penalty = call(entry, critic, real, fake, method)
    kw = options(entry, method)
    out = entry.with_norms(critic, *entry.samples(real, fake), **kw)
    assert isinstance(out, PenaltyWithNorms)
    assert torch.equal(out.penalty, penalty)
    assert out.norms.shape == (5,) and not out.norms.requires_grad
    assert bool((out.norms >= 0).all())
    with pytest.raises(TypeError, match=rf"{entry.with_norms.__name__}: .*help\("):
        entry.with_norms(critic, *entry.samples(real, fake), not_an_option=1)


def check_no_side_effects(entry: PenaltyEntry, method: str) -> None:
    """Inputs unchanged (values and version counters), no ``.grad`` set, grad mode and the
    global RNG untouched (seeded draws), works under ``torch.no_grad()``."""
    critic = mlp()
    real, fake = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    before = [(t.clone(), t._version) for t in (real, fake)]
    rng = torch.get_rng_state()
    with torch.no_grad():
        penalty = call(entry, critic, real, fake, method)
    assert penalty.requires_grad and penalty.shape == ()
    assert torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
    for t, (value, version) in zip((real, fake), before):
        assert torch.equal(t, value) and t._version == version and not t.requires_grad
    assert all(p.grad is None for p in critic.parameters())


# --- mixed precision ----------------------------------------------------------------------


class SpyScaler(torch.amp.GradScaler):
    """A GradScaler that records what it scales."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scaled: list[torch.Tensor] = []

    def scale(self, outputs):  # type: ignore[override]
        self.scaled.append(outputs)
        return super().scale(outputs)


def conv_critic(device: Any = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 1),
    ).to(device)


def check_power_of_two_scale_is_exact(entry: PenaltyEntry) -> None:
    """grad(scale * D) / scale == grad(D) bit for bit (scaling by 2^k is exact): the scaler is
    applied to the outputs once and undone out of place."""
    critic = conv_critic()
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    scaler = SpyScaler("cpu", init_scale=2.0**12)
    with_scaler = call(entry, critic, real, fake, scaler=scaler)
    assert len(scaler.scaled) == 1 and scaler.scaled[0].shape == (4, 1)
    plain = call(entry, critic, real, fake)
    assert torch.equal(with_scaler, plain)
    params = list(critic.parameters())
    ga = torch.autograd.grad(with_scaler, params, allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad(plain, params, allow_unused=True, materialize_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, and ||a|| where b is exactly 0 (biases of a piecewise-linear critic)."""
    diff = (a.float() - b.float()).norm().item()
    ref = b.float().norm().item()
    return diff / ref if ref > 0 else diff


def check_autocast_training_step(entry: PenaltyEntry, device: torch.device) -> None:
    """The full AMP recipe (penalty under autocast with scaler=, scaler.scale(loss).backward(),
    unscale_) against the float32 step: bfloat16 on CPU (8 bits of mantissa: 5% on the
    penalty, 10% on the gradients), float16 on CUDA."""
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    critic = conv_critic(device)
    real = torch.randn(8, 3, 8, 8, device=device)
    fake = torch.randn(8, 3, 8, 8, device=device)
    opt = torch.optim.SGD(critic.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    ref = call(entry, critic, real, fake)
    ref.backward()
    ref_grads = [p.grad.clone() for p in critic.parameters() if p.grad is not None]
    opt.zero_grad()
    with torch.autocast(device.type, dtype=low):
        penalty = call(entry, critic, real, fake, scaler=scaler)
    scaler.scale(penalty).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert torch.isfinite(penalty)
    assert _rel_err(penalty.detach(), ref.detach()) < 0.05
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert _rel_err(g, r) < 0.1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf/NaN found: the step was taken


# --- FSDP ---------------------------------------------------------------------------------


def check_fsdp_refused(entry: PenaltyEntry) -> None:
    """A critic with a fully_shard-ed submodule (the class fully_shard gives a module, without
    sharding, which would need a process group) is refused by the exact method with the fix;
    a penalty with a finite-difference method suggests it, and that method runs."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    inner = nn.Linear(3, 3)
    inner.__class__ = type("FSDPLinear", (fsdp.FSDPModule, nn.Linear), {})
    critic = nn.Sequential(inner, nn.Linear(3, 1))
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    fn = fn_name(entry)
    with pytest.raises(
        GraphError, match=rf"^{fn}: the critic's submodule '0' is wrapped with"
    ) as e:
        call(entry, critic, real, fake)
    assert "does not support double backward" in str(e.value)
    if "finite-difference" in entry.methods:
        assert f"{fn}(..., method='finite-difference')" in str(e.value)
        assert call(entry, critic, real, fake, "finite-difference").shape == ()
    else:
        assert "DistributedDataParallel instead of FSDP" in str(e.value)


# --- bad input ----------------------------------------------------------------------------


def _template(fn: str, name: str) -> str:
    """The one message template: "{fn}: {name} must be ..., got {value!r}. {fix}"."""
    return rf"^{re.escape(fn)}: {re.escape(name)} must be .*, got .*\. [A-Z]"


def bad_inputs(entry: PenaltyEntry, method: str) -> list[Any]:
    """``pytest.param(kwargs_or_callable, error, regex)`` for every bad-input case of ``entry``:
    the samples, the critic, and every option of the signature with a wrong type and value."""
    fn = fn_name(entry)
    arg = entry.inputs[0]
    rows: list[Any] = []

    def row(case_id: str, change: dict[str, Any], error: type, regex: str) -> None:
        rows.append(pytest.param(change, error, regex, id=case_id))

    empty = torch.zeros(0, 3, dtype=torch.float64)
    row("empty-batch", {"real": empty, "fake": empty}, ValueError, _template(fn, arg))
    row("critic-str", {"critic": "critic"}, TypeError, _template(fn, "critic"))
    row("sample-str", {"real": "x", "fake": "x"}, TypeError, _template(fn, arg))
    integer = torch.ones(4, 3, dtype=torch.long)
    row("sample-int", {"real": integer, "fake": integer}, TypeError, "through critic_kwargs")
    scalar_critic = {"critic": lambda x: x.sum()}
    row("output-no-batch", scalar_critic, ValueError, _template(fn, "the critic's output"))
    params = inspect.signature(entry.fn).parameters
    for name, p in params.items():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if isinstance(p.default, float):
            row(f"{name}-negative", {name: -1.0}, ValueError, _template(fn, name))
            row(f"{name}-nan", {name: float("nan")}, ValueError, _template(fn, name))
            row(f"{name}-str", {name: "x"}, TypeError, _template(fn, name))
    if "critic_kwargs" in params:
        row("critic_kwargs-list", {"critic_kwargs": [1]}, TypeError, _template(fn, "critic_kwargs"))
    if "scaler" in params:
        error = TypeError if method == "exact" else ValueError
        row("scaler-str", {"scaler": "x"}, error, _template(fn, "scaler"))
    if "generator" in params:
        draws = entry.random or method != "exact"
        error = TypeError if draws else ValueError
        row("generator-str", {"generator": "abc"}, error, _template(fn, "generator"))
    if "method" in params:
        row("method-unknown", {"method": "fd"}, ValueError, _template(fn, "method"))
    if "sigma" in params and method != "exact":
        row("sigma-str", {"sigma": "x"}, TypeError, _template(fn, "sigma"))
        row("sigma-zero", {"sigma": 0.0}, ValueError, _template(fn, "sigma"))
    return rows


def check_bad_input(
    entry: PenaltyEntry, method: str, change: dict[str, Any], error: type, regex: str
) -> None:
    """One bad-input row: the call with ``change`` applied raises ``error`` matching ``regex``
    (the function's name first, then the argument)."""
    change = dict(change)
    critic = change.pop("critic", mlp())
    real = change.pop("real", torch.randn(4, 3, dtype=torch.float64))
    fake = change.pop("fake", torch.randn(4, 3, dtype=torch.float64))
    kw = {**options(entry, method), **change}
    with pytest.raises(error, match=regex):
        entry.fn(critic, *entry.samples(real, fake), **kw)


def check_int_seed(entry: PenaltyEntry, method: str) -> None:
    """``generator=<int>`` is a CPU generator seeded with it (as in gradlab.curvature)."""
    if not (entry.random or method != "exact"):
        return
    critic = mlp()
    real, fake = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    kw = options(entry, method)
    by_int = entry.fn(critic, *entry.samples(real, fake), **{**kw, "generator": 5})
    seeded = torch.Generator().manual_seed(5)
    by_gen = entry.fn(critic, *entry.samples(real, fake), **{**kw, "generator": seeded})
    assert torch.equal(by_int, by_gen)
