"""Checks of ``fn`` and the point itself, before any derivative is compared.

A derivative check compares numbers that ``fn`` computes; when ``fn`` is not a function of its
inputs (it keeps state, draws random numbers, modifies its inputs) or the point is not one where
derivatives exist (NaN, inf, nothing to differentiate), every later comparison fails with a
misleading message ("backward not multiplied by grad_output", "not reentrant"). These checks name
the real cause first:

* **finite point**: every differentiated input and every output of ``fn`` at the point is finite
  (:class:`ValueError`: the caller chose the point);
* **nothing to compare**: every differentiated input, or every output, has 0 elements
  (:class:`ValueError`);
* **inputs untouched**: the first call of ``fn`` left its (copied) inputs as they were; a forward
  that writes into an input (``x.mul_(2)``, a custom ``autograd.Function`` without
  ``ctx.mark_dirty``) is a :class:`~gradlab.testing.GradientCheckError`;
* **deterministic**: a second call at the same point gives the same outputs to ``nondet_tol``
  (a counter, a cache, dropout in training mode: :class:`~gradlab.testing.GradientCheckError`);
* **memory**: ``mode="full"`` holds two dense Jacobian blocks; when they cannot fit in the free
  memory of the device, :class:`ValueError` before any work, with the hint to use ``"fast"``.

Each costs at most one extra call of ``fn`` and a pass over its inputs and outputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import gradlab._validate as v
from gradlab.testing._errors import GradientCheckError
from gradlab.testing._report import CALLER, fmt

__all__ = [
    "check_deterministic",
    "check_finite_inputs",
    "check_finite_outputs",
    "check_full_memory",
    "check_nonempty",
    "check_unmodified",
    "free_memory",
]


def _first_bad(t: torch.Tensor) -> int | None:
    """Flat index of the first non-finite entry of ``t`` (real view for complex), or ``None``."""
    r = torch.view_as_real(t) if t.is_complex() else t
    if not (r.is_floating_point() and r.numel()):
        return None
    if bool(torch.isfinite(r.detach()).all()):  # the common case
        return None
    bad = ~torch.isfinite(r.detach())
    k = int(bad.reshape(-1).nonzero()[0])
    return k // 2 if t.is_complex() else k


def check_finite_inputs(inputs: Sequence[torch.Tensor], diff: Sequence[int]) -> None:
    """ValueError naming the first differentiated input with a NaN or infinite entry."""
    for k in diff:
        x = inputs[k]
        bad = _first_bad(x)
        if bad is not None:
            value = x.detach().reshape(-1)[bad].item()
            raise ValueError(
                v.message(
                    CALLER,
                    f"inputs[{k}]",
                    "finite (derivatives are compared at the inputs by finite differences)",
                    x,
                    f"Flat element {bad} is {value}; check at a point where every input is finite",
                )
            )


def check_finite_outputs(outs: Sequence[torch.Tensor], names: Sequence[int]) -> None:
    """ValueError when ``fn`` is not finite at the point (NaN or inf in an output)."""
    for o, i in zip(outs, names):
        bad = _first_bad(o)
        if bad is not None:
            value = o.detach().reshape(-1)[bad].item()
            raise ValueError(
                f"{CALLER}: inputs must be a point where fn is finite, got one where output {i} "
                f"of fn is {value} (flat element {bad}). Finite differences and derivatives are "
                "undefined where fn is NaN or inf: check at another point (away from log(0), "
                "0/0, overflow)."
            )


def check_nonempty(
    inputs: Sequence[torch.Tensor], diff: Sequence[int], outs: Sequence[torch.Tensor]
) -> None:
    """ValueError when nothing can be compared: every differentiated input or every output has
    0 elements (a Jacobian with no entries checks nothing)."""
    if all(inputs[k].numel() == 0 for k in diff):
        k = diff[0]
        raise ValueError(
            v.message(
                CALLER,
                f"inputs[{k}]",
                "a tensor with at least one element (a 0-element input has no derivative to check)",
                inputs[k],
                "Check at inputs with at least one element",
            )
        )
    if all(o.numel() == 0 for o in outs):
        shapes = ", ".join(str(tuple(o.shape)) for o in outs)
        raise ValueError(
            f"{CALLER}: inputs must be a point where fn returns at least one element, got "
            f"outputs of shape {shapes}. A Jacobian with no rows checks nothing: use inputs for "
            "which fn returns values."
        )


def _differs(a: torch.Tensor, b: torch.Tensor, tol: float) -> int | None:
    """Flat index of the first entry where ``a`` and ``b`` differ by more than ``tol`` (NaN equal
    to NaN; infinities equal to themselves), or ``None``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0
    if torch.equal(a, b):  # the common case, one pass (NaN makes it False: checked below)
        return None
    ar = torch.view_as_real(a) if a.is_complex() else a
    br = torch.view_as_real(b) if b.is_complex() else b
    same = (ar == br) | (ar.isnan() & br.isnan())
    if tol > 0:
        same |= (ar - br).abs() <= tol
    if bool(same.all()):
        return None
    k = int((~same).reshape(-1).nonzero()[0])
    return k // 2 if a.is_complex() else k


def check_unmodified(originals: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]) -> None:
    """GradientCheckError when the call of ``fn`` changed one of its (copied) inputs."""
    for k, (x, c) in enumerate(zip(originals, copies)):
        if x.layout != torch.strided or c.layout != torch.strided:
            continue
        bad = _differs(x.detach(), c, 0.0)
        if bad is not None:
            before = x.detach().reshape(-1)[bad].item()
            after = c.reshape(-1)[bad].item()
            raise GradientCheckError(
                f"{CALLER}: fn modified its input {k} in place: flat element {bad} was "
                f"{fmt(before)} before the call and {fmt(after)} after it. A function whose "
                "gradient is checked must not change its inputs: compute out of place "
                "(x * 2, not x.mul_(2)). A custom autograd.Function whose forward writes into "
                "an input must declare it with ctx.mark_dirty(x) and return it; to check such a "
                "function, give it a copy: check_gradients(lambda x: fn(x.clone()), x). (fn was "
                "called on copies: your tensors are unchanged.)"
            )


def check_deterministic(
    fn: Callable[..., Any],
    copies: Sequence[torch.Tensor],
    first: Sequence[torch.Tensor],
    as_outputs: Callable[[Any], tuple[torch.Tensor, ...]],
    nondet_tol: float,
) -> float:
    """Call ``fn`` once more at the same point; GradientCheckError if an output differs.

    Returns the seconds that call took (a plain evaluation: what fast mode uses to decide
    whether its probes' vjps are work-bound)."""
    start = time.perf_counter()
    with torch.no_grad():
        second = as_outputs(fn(*copies))
    seconds = time.perf_counter() - start
    if len(second) != len(first):
        raise GradientCheckError(
            f"{CALLER}: fn returned {len(first)} outputs on the first call and {len(second)} on "
            "a second call with the same inputs; fn must be a deterministic function of its "
            "inputs."
        )
    for i, (a, b) in enumerate(zip(first, second)):
        bad = _differs(a.detach(), b.detach(), nondet_tol)
        if bad is None:
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            detail = f"shape {tuple(a.shape)} {a.dtype} then {tuple(b.shape)} {b.dtype}"
        else:
            detail = (
                f"flat element {bad} was {fmt(a.reshape(-1)[bad].item())} then "
                f"{fmt(b.reshape(-1)[bad].item())}"
            )
        raise GradientCheckError(
            f"{CALLER}: fn is not deterministic: two calls with the same inputs gave different "
            f"values of output {i} ({detail}; nondet_tol {nondet_tol:g}). Gradients can only be "
            "checked for a function of its inputs alone: no state changed by a call (a counter, "
            "a cache, running statistics), no randomness (dropout in training mode: call "
            "model.eval(), or reseed inside fn with torch.manual_seed). If fn is "
            "nondeterministic by small amounts on purpose (atomic adds on a GPU), pass "
            "nondet_tol=<largest expected difference>."
        )
    return seconds


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CPU: available physical memory), or ``None`` if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def full_mode_bytes(xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> int:
    """Peak bytes of ``mode="full"``: the analytical Jacobian rows of every output w.r.t. one
    input and the finite-difference block of that input (both dense), plus the comparison's
    temporaries (difference, tolerance, ratio) of the largest block."""
    m_total = sum(o.numel() for o in outs)
    m_max = max((o.numel() for o in outs), default=0)
    worst = 0
    for x in xs:
        n = x.numel()
        size = x.element_size()
        worst = max(worst, size * n * (2 * m_total + 3 * m_max))
    return worst


def check_full_memory(
    mode: str, xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], inputs: Sequence[int]
) -> None:
    """ValueError (naming ``mode``) when full mode's Jacobians cannot fit in free memory."""
    if mode != "full" or not xs:
        return
    need = full_mode_bytes(xs, outs)
    if need < 2**28:  # below 256 MiB: never worth a system call
        return
    free = free_memory(xs[0].device)
    if free is None or need <= free:
        return
    n = max(x.numel() for x in xs)
    m = max(o.numel() for o in outs)
    raise ValueError(
        v.message(
            CALLER,
            "mode",
            f"'fast' for a Jacobian this large (about {m} x {n} entries: mode='full' needs about "
            f"{need / 2**30:.1f} GiB, {xs[0].device} has {free / 2**30:.1f} GiB free)",
            mode,
            "Pass mode='fast' (random signed directions, memory O(probes * (n + m)) and the "
            "same power against a wrong entry), or check a smaller problem",
        )
    )
