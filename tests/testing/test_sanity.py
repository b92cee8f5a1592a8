"""check_gradients names the real cause when fn or the point is unfit for a derivative check
(gradlab/testing/_sanity.py and the grad_output check of _contract.py): each case used to fail
with a misleading message (a raw torch error, or blame on grad_output scaling / the vmap rule)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks._planted import CASES
from gradlab.testing import GradientCheckError, _sanity, check_gradients

F64 = torch.float64
MODES = ["full", "fast"]


def _x(device: torch.device | str, n: int = 5) -> torch.Tensor:
    return torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(n)).to(device)


_SIN_IN_PLACE_GRAD = CASES["grad_output in place"].make(True)[0]  # g.mul_(cos x) in backward
_DOUBLE_IN_PLACE = CASES["input in place"].make(True)[0]  # x.mul_(2) in forward, no mark_dirty


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.sin()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * torch.zeros_like(g) / torch.zeros_like(g)  # 0/0


@pytest.mark.parametrize("mode", MODES)
def test_backward_writing_into_grad_output_is_named(mode: str, device: torch.device) -> None:
    x = _x(device)
    # The backward's numbers are right (torch's own vjp of sin agrees) ...
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_SIN_IN_PLACE_GRAD(xr), xr, torch.ones_like(x))
    torch.testing.assert_close(g, torch.cos(x), rtol=0, atol=0)
    # ... and yet the caller's cotangent is overwritten: check_gradients says so.
    cot = torch.ones_like(x)
    torch.autograd.grad(_SIN_IN_PLACE_GRAD(xr), xr, cot)
    assert not torch.equal(cot, torch.ones_like(x))
    with pytest.raises(GradientCheckError, match=r"modified its grad_output in place") as info:
        check_gradients(_SIN_IN_PLACE_GRAD, x, mode=mode)
    assert "not multiplied" not in str(info.value) and "g * torch.cos(x)" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_forward_writing_into_its_input_is_named(mode: str, device: torch.device) -> None:
    x = _x(device)
    before = x.clone()
    with pytest.raises(GradientCheckError, match=r"fn modified its input 0 in place.*mark_dirty"):
        check_gradients(_DOUBLE_IN_PLACE, x, mode=mode)
    assert torch.equal(x, before)  # the caller's tensor is untouched


@pytest.mark.parametrize("mode", MODES)
def test_plain_function_mutating_its_input(mode: str, device: torch.device) -> None:
    def fn(v: torch.Tensor) -> torch.Tensor:
        v.mul_(2.0)
        return v.sin()

    x = _x(device)
    with pytest.raises(GradientCheckError, match=r"fn modified its input 0 in place: flat element"):
        check_gradients(fn, x, mode=mode)
    # a constant input modified in place is named too (input 1)
    with pytest.raises(GradientCheckError, match=r"fn modified its input 1 in place"):
        check_gradients(lambda a, c: a * c.add_(1.0), x.clone().requires_grad_(True), x.clone())


@pytest.mark.parametrize("mode", MODES)
def test_nan_backward_is_not_blamed_on_grad_output(mode: str, device: torch.device) -> None:
    with pytest.raises(GradientCheckError, match=r"the backward returned nan for d output 0") as e:
        check_gradients(_NaNBackward.apply, _x(device), mode=mode)
    assert "not multiplied" not in str(e.value)


def test_infinite_derivative_is_named(device: torch.device) -> None:
    # sqrt at 0: a finite function value, an infinite derivative
    x = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    with pytest.raises(GradientCheckError, match=r"returned -?inf .* derivative is infinite here"):
        check_gradients(torch.sqrt, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_input(bad: float, mode: str, device: torch.device) -> None:
    x = torch.tensor([0.5, bad, 1.0], dtype=F64, device=device)
    pattern = (
        r"^check_gradients: inputs\[0\] must be finite .*, got tensor\(shape=\(3,\), "
        rf"dtype=torch.float64, device={torch.device(device).type}.*\)\. Flat element 1 is "
        rf"{re.escape(str(bad))}; check at a point"
    )
    with pytest.raises(ValueError, match=pattern):
        check_gradients(torch.sin, x, mode=mode)


def test_non_finite_output(device: torch.device) -> None:
    x = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"inputs must be a point where fn is finite.*output 0"):
        check_gradients(torch.log, x)


@pytest.mark.parametrize("mode", MODES)
def test_empty_input(mode: str, device: torch.device) -> None:
    x = torch.zeros(0, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a tensor with at least one elem"):
        check_gradients(torch.sin, x, mode=mode)
    with pytest.raises(ValueError, match=r"fn returns at least one element, got outputs of sh"):
        check_gradients(lambda v: v[:0], _x(device), mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_one_empty_input_among_others_is_compared_where_it_can(
    mode: str, device: torch.device
) -> None:
    # the empty block has nothing to compare; the other is checked (and found right)
    x, e = _x(device), torch.zeros(0, dtype=F64, device=device)
    report = check_gradients(lambda a, b: a.sin() + b.sum(), x, e, mode=mode)
    assert report.margin < 1


@pytest.mark.parametrize("mode", MODES)
def test_stateful_function(mode: str, device: torch.device) -> None:
    calls = [0]

    def counter(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return v * calls[0]

    with pytest.raises(GradientCheckError, match=r"fn is not deterministic.*no state changed") as e:
        check_gradients(counter, _x(device), mode=mode)
    assert "vmap" not in str(e.value) and "not multiplied" not in str(e.value)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_in_training_mode(mode: str, device: torch.device) -> None:
    drop = torch.nn.Dropout(0.5).to(device)
    x = _x(device, 64)
    with pytest.raises(GradientCheckError, match=r"not deterministic.*dropout.*model\.eval\(\)"):
        check_gradients(drop, x, mode=mode)
    drop.eval()  # the fix the message gives: now it is the identity and passes
    assert check_gradients(drop, x, mode=mode).margin < 1


def test_small_nondeterminism_within_nondet_tol_passes(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)

    def jitter(v: torch.Tensor) -> torch.Tensor:
        return v.sin() + 1e-14 * torch.rand((), generator=gen, dtype=F64).to(v.device)

    x = _x(device)
    with pytest.raises(GradientCheckError, match="not deterministic"):
        check_gradients(jitter, x)
    assert check_gradients(jitter, x, nondet_tol=1e-12).margin < 1


def test_full_mode_refuses_a_jacobian_that_cannot_fit() -> None:
    # 200000 x 200000 float64 entries (twice): hundreds of GiB. Refused before any work, with
    # the fix; fast mode checks the same function.
    x = torch.linspace(-1, 1, 200_000, dtype=F64)
    with pytest.raises(
        ValueError, match=r"check_gradients: mode must be 'fast' for a Jacobian"
    ) as e:
        check_gradients(torch.sin, x)
    assert "got 'full'. Pass mode='fast'" in str(e.value)
    need = _sanity.full_mode_bytes([x], [x])
    assert need == 8 * 200_000 * (2 * 200_000 + 3 * 200_000)


def test_full_mode_memory_check_uses_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(3000, dtype=F64)  # full mode: 8 * 3000 * 15000 = 360 MB
    monkeypatch.setattr(_sanity, "free_memory", lambda device: 2**20)
    with pytest.raises(ValueError, match=r"needs about 0\.3 GiB, cpu has 0\.0 GiB free"):
        check_gradients(torch.sin, x)
    monkeypatch.setattr(_sanity, "free_memory", lambda device: None)  # unknown: no refusal
    _sanity.check_full_memory("full", [x], [x], [0])
