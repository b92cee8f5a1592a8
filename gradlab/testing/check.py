"""check_gradients: autograd's derivatives against finite differences, vectorised.

Two modes compare the same thing at different cost:

``"full"``
    Every Jacobian entry. Autograd's Jacobian is one batched vector-Jacobian product over the
    identity basis per output (``torch.autograd.grad(..., is_grads_batched=True)``, a loop of
    ``torch.autograd.grad`` when the backward cannot be batched); the finite differences are one
    vmapped batch per input (:func:`~gradlab.testing.numerical_jacobian`).
``"fast"``
    ``probes`` random *signed* direction pairs per output/input block: :math:`u^\\top J v` from
    one batched vjp against :math:`u^\\top (f(x + hv) - f(x - hv)) / 2h`.

Why fast mode needs signed directions and an uninflated tolerance: if ``J`` has one wrong entry
:math:`E_{rc} = d`, then :math:`u^\\top E v = u_r v_c d`. With Rademacher (random +-1) directions
this is exactly :math:`\\pm d` for *every* probe, so the error is seen whenever
``|d| > atol + rtol * ||J v||_2`` (``||J v||_2`` is the typical size of :math:`u^\\top J v` over
random ``u``, about ``||J||_F``). torch's ``gradcheck(fast_mode=True)`` instead scales ``atol``
by ``sum(u) * sum(v)`` over non-negative directions, which at n = 512 allows errors of order 1.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gradlab._errors import GraphError
from gradlab.testing._common import (
    METHODS,
    NOISE_FACTOR,
    as_outputs,
    check_choice,
    check_fn,
    check_inputs,
    check_positive,
    default_step,
    default_tolerances,
    least_precise,
    machine_eps,
)
from gradlab.testing._errors import GradientCheckError, NonDifferentiablePointError
from gradlab.testing.numerical import Evaluator, exact_delta, fd_transposed, steps_for

__all__ = ["GradientCheckReport", "Location", "check_gradients"]

_CALLER = "check_gradients"
#: Largest block (entries) fast mode localises with a full comparison after a failed probe.
_LOCALIZE_LIMIT = 2**22
#: Rows of the identity basis per batched vjp (bounds memory of the analytical Jacobian).
_ROWS_BUDGET = 2**23


@dataclass(frozen=True)
class Location:
    """Where in the Jacobian an entry lives.

    ``output`` indexes ``fn``'s outputs (for ``order=2``: the input whose gradient is
    differentiated), ``input`` the inputs; the elements are multi-indices into those tensors,
    ``None`` when only random directions were compared.
    """

    output: int
    input: int
    output_element: tuple[int, ...] | None = None
    input_element: tuple[int, ...] | None = None
    order: int = 1

    def __str__(self) -> str:
        out = f"output {self.output}" if self.order == 1 else f"grad[input {self.output}]"
        if self.output_element is not None:
            out += str(list(self.output_element))
        inp = f"input {self.input}"
        if self.input_element is not None:
            inp += str(list(self.input_element))
        return f"d {out} / d {inp}"


@dataclass(frozen=True)
class GradientCheckReport:
    """What :func:`check_gradients` compared, returned when every comparison passed.

    Attributes:
        order: 1 or 2 (for 2, ``first_order`` holds the report of the first-order check).
        mode: ``"full"`` or ``"fast"``.
        method: finite-difference method (``"central"`` or ``"richardson"``).
        atol, rtol: tolerances used: an entry passes if
            ``|analytical - numerical| <= atol + rtol * scale + rounding``, where ``scale`` is
            ``|numerical|`` (full) or ``||J v||_2`` (fast) and ``rounding`` is the floating-point
            noise of the finite difference, ``c * unit_roundoff * |f(x)| / step``.
        eps: base finite-difference step per input.
        max_abs_error: largest ``|analytical - numerical|``.
        max_rel_error: largest ``|analytical - numerical| / |numerical|`` over entries with
            ``|numerical| > atol`` (0.0 if none).
        worst: location of ``max_abs_error`` (``None`` if nothing was compared).
        margin: largest ``|analytical - numerical| / tolerance`` (below 1 for a pass).
        compared: number of values compared (Jacobian entries, or probes x blocks).
        probes: random direction pairs per block (0 in full mode).
        seed: seed of the random directions / cotangents (``None`` if none were drawn).
        kinks: entries at non-differentiable points skipped with ``kinks="skip"``.
        first_order: for ``order=2``, the report of the first-order check.
    """

    order: int
    mode: str
    method: str
    atol: float
    rtol: float
    eps: tuple[float, ...]
    max_abs_error: float
    max_rel_error: float
    worst: Location | None
    margin: float
    compared: int
    probes: int
    seed: int | None
    kinks: tuple[Location, ...] = ()
    first_order: GradientCheckReport | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return (
            f"gradients OK (order {self.order}, mode {self.mode!r}, {self.method}): "
            f"{self.compared} values, max abs error {self.max_abs_error:.2e}, "
            f"max rel error {self.max_rel_error:.2e}, margin {self.margin:.2g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
            + (f", {len(self.kinks)} kinks skipped" if self.kinks else "")
        )


@dataclass
class _Settings:
    mode: str
    method: str
    eps: float | None
    atol: float
    rtol: float
    probes: int
    directions: str
    seed: int
    kinks: str
    order: int
    unit: float


@dataclass
class _Acc:
    """Running maxima over every compared value."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    margin: float = 0.0
    worst: Location | None = None
    compared: int = 0
    kinks: list[Location] = field(default_factory=list)

    def add(
        self,
        diff: torch.Tensor,
        tol: torch.Tensor,
        abs_num: torch.Tensor,
        atol: float,
        where: Callable[[int], Location],
        margin: float | None = None,
        work: torch.Tensor | None = None,
    ) -> None:
        """Fold in passing entries: ``|a - n|``, their tolerances and ``|n|`` (any shape).

        ``margin``: ``max(diff / tol)`` when the caller has it already; ``work``: a scratch
        tensor of ``diff``'s shape that may be overwritten.
        """
        if diff.numel() == 0:
            return
        self.compared += diff.numel()
        dmax, k = diff.reshape(-1).max(0)  # row-major index over diff's shape; no NaN here
        if self.worst is None or float(dmax) > self.max_abs:
            self.max_abs, self.worst = float(dmax), where(int(k))
        rel = torch.div(diff, abs_num, out=work) if work is not None else diff / abs_num
        rel.masked_fill_(abs_num <= atol, 0.0)
        self.max_rel = max(self.max_rel, float(rel.max()))
        if margin is None:
            margin = float((diff / tol).max())
        self.margin = max(self.margin, margin)


def _constant(loc: Location) -> Callable[[int], Location]:
    return lambda k: loc


def _unravel(k: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for s in reversed(shape):
        idx.append(k % s)
        k //= s
    return tuple(reversed(idx))


def _fmt(x: float) -> str:
    return f"{x:.10g}"


# ----------------------------------------------------------------------------- analytical side


def _vjp_rows(
    out: torch.Tensor, xs_req: tuple[torch.Tensor, ...], cot: torch.Tensor
) -> list[torch.Tensor]:
    """``cot[b]^T J`` for each row of ``cot`` (``[B, *out.shape]``): per input ``[B, n_j]``."""
    b = cot.shape[0]
    if not out.requires_grad:
        return [x.new_zeros(b, x.numel()) for x in xs_req]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "performance drop ... batching rule" notices
            grads = torch.autograd.grad(
                out, xs_req, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        rows = [
            g.reshape(b, -1) if g is not None else x.new_zeros(b, x.numel())
            for g, x in zip(grads, xs_req)
        ]
    except Exception:  # backward not batchable (e.g. .item() in backward): one vjp at a time
        per_row = []
        for c in cot:
            gs = torch.autograd.grad(out, xs_req, c, retain_graph=True, allow_unused=True)
            per_row.append(
                [g if g is not None else torch.zeros_like(x) for g, x in zip(gs, xs_req)]
            )
        rows = [torch.stack([r[j].reshape(-1) for r in per_row]) for j in range(len(xs_req))]
    return rows


class _Analytic:
    """Vector-Jacobian products of the checked function, batched over cotangents.

    First choice: :func:`torch.func.vjp` vmapped over the cotangents (one batched backward).
    If ``fn`` cannot be transformed by torch.func (old-style ``autograd.Function``, a backward
    without a vmap rule, ``torch.autograd.grad`` inside), the ordinary autograd graph is built and
    differentiated with ``is_grads_batched=True``, or one cotangent at a time.
    """

    def __init__(
        self, problem: _Problem, xs: tuple[torch.Tensor, ...], f0: tuple[torch.Tensor, ...]
    ):
        self.problem = problem
        self.xs = xs
        self.f0 = f0
        self.vjp_fn: Callable[..., Any] | None = None
        self._graph: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        try:
            with torch.enable_grad():
                res = torch.func.vjp(self._outputs, *xs)
            outs, self.vjp_fn = res[0], res[1]
            if len(outs) != len(f0):
                self.vjp_fn = None
        except Exception:
            self.vjp_fn = None

    def _outputs(self, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return as_outputs(self.problem.num_fn(*a), _CALLER)

    def _vmapped_rows(self, i: int, cot: torch.Tensor) -> list[torch.Tensor]:
        assert self.vjp_fn is not None
        b = cot.shape[0]
        cots = tuple(cot if k == i else torch.zeros_like(o) for k, o in enumerate(self.f0))
        dims = tuple(0 if k == i else None for k in range(len(self.f0)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = torch.func.vmap(self.vjp_fn, in_dims=(dims,))(cots)
        return [r.reshape(b, -1).detach() for r in res]

    def graph(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        if self._graph is None:
            with torch.enable_grad():
                xs_req = tuple(x.clone().requires_grad_(True) for x in self.xs)
                outs = as_outputs(self.problem.graph_fn(*xs_req), _CALLER)
            self._graph = (outs, xs_req)
        return self._graph

    def rows(self, i: int, cot: torch.Tensor) -> list[torch.Tensor]:
        """``cot[b]^T J_i`` for output ``i``: per input ``[B, n_j]``."""
        if self.vjp_fn is not None:
            # A column-major cotangent batch may trip a backward that calls .view(): then the
            # same batch, contiguous, before giving up on torch.func.
            try:
                return self._vmapped_rows(i, cot)
            except Exception:
                if not cot.is_contiguous():
                    try:
                        return self._vmapped_rows(i, cot.contiguous())
                    except Exception:
                        pass
            self.vjp_fn = None  # fall back to the autograd graph from now on
        outs, xs_req = self.graph()
        return _vjp_rows(outs[i], xs_req, cot)


def _analytical_jacobian(an: _Analytic, i: int) -> list[torch.Tensor]:
    """Rows of the Jacobian of output ``i`` w.r.t. every input: per input ``[m_i, n_j]``.

    The identity basis is built column-major (``zeros(m, rows).T``): a batched backward through
    a matrix product then runs as one GEMM on contiguous operands (about 1.7x faster than with
    the row-major basis on CPU), and the rows come back in the ``[n_j, m_i]`` memory layout of
    the finite differences, so the comparison reads both in order.
    """
    out = an.f0[i]
    m = out.numel()
    width = sum(x.numel() for x in an.xs) + m
    chunk = max(1, _ROWS_BUDGET // max(1, width))
    parts = []
    for s in range(0, m, chunk):
        rows = min(m, s + chunk) - s
        basis = torch.zeros(m, rows, dtype=out.dtype, device=out.device).T
        basis[:, s : s + rows].diagonal().fill_(1)
        parts.append(an.rows(i, basis.view(rows, *out.shape)))
    if not parts:
        return [x.new_zeros(0, x.numel()) for x in an.xs]
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[j] for p in parts]) for j in range(len(an.xs))]


# ----------------------------------------------------------------------------- comparison


@dataclass
class _Problem:
    """The function checked at one order: graph-building form and finite-difference form."""

    graph_fn: Callable[..., Any]  # builds an autograd graph from inputs that require grad
    num_fn: Callable[..., Any]  # evaluated under vmap
    loop_fn: Callable[..., Any]  # evaluated point by point when vmap fails


def _compare(
    problem: _Problem,
    xs: tuple[torch.Tensor, ...],
    st: _Settings,
    f0: tuple[torch.Tensor, ...] | None = None,
) -> _Acc:
    acc = _Acc()
    ev = Evaluator(problem.num_fn, xs, _CALLER, loop_fn=problem.loop_fn, f0=f0)
    an = _Analytic(problem, xs, ev.f0)
    unit = max(st.unit, machine_eps(least_precise(list(ev.f0) + list(xs))))
    steps = [
        steps_for(x, st.eps if st.eps is not None else default_step(st.method, x.dtype)) for x in xs
    ]
    if st.mode == "full":
        analytical = [_analytical_jacobian(an, i) for i in range(len(ev.f0))]
        for j in range(len(xs)):
            numerical = _fd_all(ev, j, steps[j], st.method)
            for i in range(len(ev.f0)):
                _check_block(ev, i, j, analytical[i][j], numerical[i], steps[j], st, unit, acc)
    else:
        _fast(ev, an, steps, st, unit, acc)
    return acc


def _fd_all(ev: Evaluator, j: int, step: torch.Tensor, method: str) -> list[torch.Tensor]:
    """Finite-difference blocks ``[m_i, n_j]`` w.r.t. input ``j`` (views, not copies)."""
    return [b.T for b in fd_transposed(ev, j, step, method)]


def _check_block(
    ev: Evaluator,
    i: int,
    j: int,
    a: torch.Tensor,
    n: torch.Tensor,
    step: torch.Tensor,
    st: _Settings,
    unit: float,
    acc: _Acc,
) -> None:
    """Compare one full ``[m_i, n_j]`` block; raise on a wrong entry or (by default) a kink.

    The passing case (every entry within tolerance) costs a few vectorised passes, done on the
    transposed ``[n_j, m_i]`` views since that is the memory layout both Jacobians come in;
    only when something mismatches are the bad entries located and examined.
    """
    a = a.to(n.dtype)
    out_shape, in_shape = ev.f0[i].shape, ev.xs[j].shape
    m = n.shape[0]
    a_t, n_t = a.T, n.T
    # Few fresh allocations and in-place passes: at n = 512 a new 2 MB tensor costs more than
    # the arithmetic that fills it.
    diff_t = torch.sub(a_t, n_t).abs_()
    abs_t = n_t.abs()
    # atol + rtol |n| + c u |f0_r| / h_c (the rounding noise, an outer product)
    noise_row = NOISE_FACTOR[st.method] * unit * ev.f0[i].detach().reshape(1, -1).abs()
    tol_t = torch.mul(abs_t, st.rtol).add_(st.atol)
    tol_t.addcmul_(step.reciprocal().reshape(-1, 1), noise_row)
    work = torch.div(diff_t, tol_t)
    margin = float(work.max())
    # fl(d / t) < 1 implies d < t, so only a margin of 1 or NaN (e.g. 0 / 0) needs the exact test.
    if margin < 1 or (not margin > 1 and bool((diff_t <= tol_t).all())):

        def where_t(k: int) -> Location:
            c, r = divmod(k, m)
            return Location(i, j, _unravel(r, out_shape), _unravel(c, in_shape), st.order)

        acc.add(diff_t, tol_t, abs_t, st.atol, where_t, margin=margin, work=work)
        return
    diff, tol = diff_t.T, tol_t.T
    bad = ~(diff <= tol)

    def where(k: int) -> Location:
        r, c = divmod(k, n.shape[1])
        return Location(i, j, _unravel(r, out_shape), _unravel(c, in_shape), st.order)

    rows, cols = bad.nonzero(as_tuple=True)
    is_kink = _kink_mask(ev, i, j, rows, cols, a, step, st, unit)
    wrong = ~is_kink
    if bool(wrong.any()):
        d = torch.where(wrong, diff[rows, cols], torch.zeros_like(diff[rows, cols]))
        k = int(torch.argmax(torch.nan_to_num(d, nan=math.inf)))
        r, c = int(rows[k]), int(cols[k])
        loc = where(r * n.shape[1] + c)
        _raise_wrong(
            loc,
            float(a[r, c]),
            float(n[r, c]),
            float(diff[r, c]),
            float(tol[r, c]),
            float(n[r, c].abs()),
            int(wrong.sum()),
            n.numel(),
            st,
            kinks=int(is_kink.sum()),
        )
    kink_locs = [where(int(r) * n.shape[1] + int(c)) for r, c in zip(rows, cols)]
    if st.kinks == "raise":
        _raise_kink(kink_locs, ev, i, j, rows, cols, a, n, step, st)
    acc.kinks.extend(kink_locs)
    keep = ~bad
    acc.add(
        diff[keep],
        tol[keep],
        n[keep].abs(),
        st.atol,
        lambda k: where(int(keep.reshape(-1).nonzero()[k])),
    )


def _one_sided(
    ev: Evaluator, j: int, cols: torch.Tensor, step: torch.Tensor, scale: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward and backward one-sided differences for elements ``cols``: per output [m_i, c]."""
    x = ev.xs[j].reshape(-1)
    h = step[cols] * scale
    plus, minus = exact_delta(x[cols], h), exact_delta(x[cols], -h)
    c, n = len(cols), x.numel()
    disp = torch.zeros(2 * c, n, dtype=x.dtype, device=x.device)
    ar = torch.arange(c, device=x.device)
    disp[ar, cols] = plus
    disp[c + ar, cols] = minus
    f = ev.displaced(j, disp)
    fwd = [((fi[:c] - f0.reshape(1, -1)) / plus.unsqueeze(1)).T for fi, f0 in zip(f, ev.f0)]
    bwd = [((f0.reshape(1, -1) - fi[c:]) / (-minus).unsqueeze(1)).T for fi, f0 in zip(f, ev.f0)]
    return fwd, bwd


def _kink_mask(
    ev: Evaluator,
    i: int,
    j: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    a: torch.Tensor,
    step: torch.Tensor,
    st: _Settings,
    unit: float,
) -> torch.Tensor:
    """For each mismatching entry: is it a kink (see :class:`NonDifferentiablePointError`)?"""
    ucols, inv = torch.unique(cols, return_inverse=True)
    fb, bb = _one_sided(ev, j, ucols, step, 1.0)
    fs, bs = _one_sided(ev, j, ucols, step, 0.1)
    right, left = fs[i][rows, inv], bs[i][rows, inv]
    gap_small = (right - left).abs()
    gap_big = (fb[i][rows, inv] - bb[i][rows, inv]).abs()
    f0 = ev.f0[i].reshape(-1)[rows].abs()
    noise = 2 * NOISE_FACTOR[st.method] * unit * f0 / (0.1 * step[cols])
    tol = st.atol + st.rtol * torch.maximum(left.abs(), right.abs()) + noise
    av = a[rows, cols].to(left.dtype)
    between = (av >= torch.minimum(left, right) - tol) & (av <= torch.maximum(left, right) + tol)
    return (gap_small > tol) & (gap_small >= 0.5 * gap_big) & between


def _raise_wrong(
    loc: Location,
    analytical: float,
    numerical: float,
    diff: float,
    tol: float,
    scale: float,
    mismatches: int | None,
    total: int,
    st: _Settings,
    *,
    kinks: int = 0,
    probe: str = "",
) -> None:
    what = "u^T J v" if probe else "value"
    scale_name = "||J v||_2" if probe else "|numerical|"
    rounding = tol - st.atol - st.rtol * scale
    count = (
        f"; {mismatches} of {total} entries of this block mismatch"
        if mismatches is not None
        else ""
    )
    if kinks:
        count += f" ({kinks} more at non-differentiable points)"
    if st.mode == "fast" and not probe:
        count += " (a random probe failed, then this block was compared entry by entry)"
    seed = f", seed {st.seed}" if st.mode == "fast" or st.order == 2 else ""
    raise GradientCheckError(
        f"{_CALLER}: wrong {'second ' if st.order == 2 else ''}derivative {loc}{probe}: "
        f"analytical {what} {_fmt(analytical)} vs numerical {_fmt(numerical)}, "
        f"|difference| {diff:.3e} > tolerance {tol:.3e} (atol {st.atol:g} + rtol {st.rtol:g} * "
        f"{scale_name} {scale:.3g} + rounding {max(rounding, 0.0):.2g}){count}. "
        f"[order {st.order}, mode {st.mode!r}, method {st.method!r}{seed}] "
        "Fix the backward of fn; if the finite differences are inaccurate here, pass "
        "method='richardson' or larger atol/rtol.",
        location=loc,
        analytical=analytical,
        numerical=numerical,
        tolerance=tol,
        mismatches=mismatches,
    )


def _raise_kink(
    locs: list[Location],
    ev: Evaluator,
    i: int,
    j: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    a: torch.Tensor,
    n: torch.Tensor,
    step: torch.Tensor,
    st: _Settings,
) -> None:
    r, c = int(rows[0]), int(cols[0])
    fs, bs = _one_sided(ev, j, cols[:1], step, 0.1)
    raise NonDifferentiablePointError(
        f"{_CALLER}: {len(locs)} Jacobian "
        f"{'entry is' if len(locs) == 1 else 'entries are'} at non-differentiable points "
        f"(kinks), first {locs[0]}: one-sided differences disagree "
        f"(left {_fmt(float(bs[i][r, 0]))}, "
        f"right {_fmt(float(fs[i][r, 0]))}; analytical {_fmt(float(a[r, c]))} lies between, "
        f"central difference {_fmt(float(n[r, c]))}). The gradient is not wrong, the point is "
        "not differentiable: move it away from the kink (e.g. strategies.tensors(avoid=..., "
        "margin=...)) or pass kinks='skip' to record such entries in the report. "
        f"[order {st.order}, mode {st.mode!r}, method {st.method!r}]",
        kinks=tuple(locs),
    )


# ----------------------------------------------------------------------------- fast mode


def _directions(
    n: int, shape: tuple[int, ...], st: _Settings, gen: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    if st.directions == "rademacher":
        d = torch.randint(0, 2, (n, *shape), generator=gen).mul(2).sub(1)
    else:
        d = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    return d.to(dtype=like.dtype, device=like.device)


def _fast(
    ev: Evaluator,
    an: _Analytic,
    steps: list[torch.Tensor],
    st: _Settings,
    unit: float,
    acc: _Acc,
) -> None:
    p = st.probes
    gen = torch.Generator().manual_seed(st.seed)
    outs = ev.f0
    us = [_directions(p, tuple(o.shape), st, gen, o) for o in outs]
    vs = [_directions(p, (x.numel(),), st, gen, x) for x in ev.xs]
    # u^T J for every probe, output and input: jtu[i][j] is [p, n_j].
    jtu = [an.rows(i, u) for i, u in enumerate(us)]
    for j, x in enumerate(ev.xs):
        if x.numel() == 0:
            continue
        base = st.eps if st.eps is not None else default_step(st.method, x.dtype)
        w = vs[j] * (steps[j] / base)  # directions scaled like the steps: max(1, |x_k|)
        levels = [1.0] if st.method == "central" else [1.0, 0.5]
        disp = torch.cat([s * lv * base * w for lv in levels for s in (1.0, -1.0)])
        f = ev.displaced(j, disp)
        for i in range(len(outs)):
            fi = f[i]
            jv = (fi[:p] - fi[p : 2 * p]) / (2 * base)
            if st.method == "richardson":
                jv_half = (fi[2 * p : 3 * p] - fi[3 * p :]) / base
                jv = (4 * jv_half - jv) / 3
            u = us[i].reshape(p, -1).to(jv.dtype)
            num = (u * jv).sum(1)
            ana = (jtu[i][j].to(w.dtype) * w).sum(1).to(num.dtype)
            scale = jv.norm(dim=1)
            noise = (
                NOISE_FACTOR[st.method] * unit * (u * ev.f0[i].reshape(1, -1)).abs().sum(1) / base
            )
            tol = st.atol + st.rtol * scale + noise
            diff = (ana - num).abs()
            bad = ~(diff <= tol)
            if bool(bad.any()):
                _localize(ev, i, j, an, steps[j], st, unit, acc, diff, tol, ana, num, scale, bad)
                continue
            acc.add(diff, tol, num.abs(), st.atol, _constant(Location(i, j, None, None, st.order)))


def _localize(
    ev: Evaluator,
    i: int,
    j: int,
    an: _Analytic,
    step: torch.Tensor,
    st: _Settings,
    unit: float,
    acc: _Acc,
    diff: torch.Tensor,
    tol: torch.Tensor,
    ana: torch.Tensor,
    num: torch.Tensor,
    scale: torch.Tensor,
    bad: torch.Tensor,
) -> None:
    """A probe failed: compare the block in full to name the element (or raise on the probe)."""
    m, n = ev.f0[i].numel(), ev.xs[j].numel()
    if m * n <= _LOCALIZE_LIMIT:
        # Raises on a wrong entry or a kink; returns when every entry passes (then the full
        # comparison, the stricter one per entry, is the verdict) or kinks were skipped.
        a = _analytical_jacobian(an, i)[j]
        _check_block(ev, i, j, a, _fd_all(ev, j, step, st.method)[i], step, st, unit, acc)
        return
    k = int(torch.argmax(torch.where(bad, diff / tol, torch.zeros_like(diff))))
    _raise_wrong(
        Location(i, j, None, None, st.order),
        float(ana[k]),
        float(num[k]),
        float(diff[k]),
        float(tol[k]),
        float(scale[k]),
        None,
        m * n,
        st,
        probe=f" along random signed directions (probe {k + 1} of {st.probes})",
    )


# ----------------------------------------------------------------------------- public


def _first_order_problem(fn: Callable[..., Any]) -> _Problem:
    return _Problem(graph_fn=fn, num_fn=fn, loop_fn=fn)


def _second_order_problem(
    fn: Callable[..., Any], xs: tuple[torch.Tensor, ...], seed: int
) -> _Problem:
    """``g(x) = J(x)^T v`` (the gradient of ``<v, fn(x)>``) with fixed random signs ``v``."""
    gen = torch.Generator().manual_seed(seed + 1)
    f0 = as_outputs(fn(*xs), _CALLER)
    vs = tuple(
        (torch.randint(0, 2, tuple(o.shape), generator=gen) * 2 - 1).to(o.dtype).to(o.device)
        for o in f0
    )

    def grad_of(xr: tuple[torch.Tensor, ...], create_graph: bool) -> tuple[torch.Tensor, ...]:
        outs = as_outputs(fn(*xr), _CALLER)
        pairs = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(x) for x in xr)
        gs = torch.autograd.grad(
            [o for o, _ in pairs],
            xr,
            [v for _, v in pairs],
            create_graph=create_graph,
            allow_unused=True,
        )
        return tuple(g if g is not None else torch.zeros_like(x) for g, x in zip(gs, xr))

    def graph_fn(*xr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad_of(xr, True)

    def num_fn(*xv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def outputs(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return as_outputs(fn(*a), _CALLER)

        vjp_fn = torch.func.vjp(outputs, *xv)[1]
        return tuple(vjp_fn(vs))

    def loop_fn(*xv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            xr = tuple(x.detach().requires_grad_(True) for x in xv)
            return tuple(g.detach() for g in grad_of(xr, False))

    return _Problem(graph_fn=graph_fn, num_fn=num_fn, loop_fn=loop_fn)


def check_gradients(
    fn: Callable[..., Any],
    *inputs: torch.Tensor,
    order: Literal[1, 2] = 1,
    mode: Literal["full", "fast"] = "full",
    atol: float | None = None,
    rtol: float | None = None,
    eps: float | None = None,
    method: Literal["central", "richardson"] = "central",
    probes: int = 16,
    directions: Literal["rademacher", "gaussian"] = "rademacher",
    seed: int | None = None,
    kinks: Literal["raise", "skip"] = "raise",
) -> GradientCheckReport:
    r"""Check autograd's derivatives of ``fn`` at ``inputs`` against finite differences.

    ``order=1`` compares the Jacobian :math:`J = \partial f / \partial x` of every output
    w.r.t. every input. ``order=2`` first does that, then checks the derivative of the
    gradient: with fixed random signs :math:`v` per output it compares the Jacobian of
    :math:`g(x) = J(x)^\top v` computed by double backward (``create_graph=True``) with finite
    differences of ``g`` (like ``torch.autograd.gradgradcheck``).

    An entry passes if :math:`|a - n| \le \mathrm{atol} + \mathrm{rtol}\,|n| + \rho`, ``a`` the
    analytical and ``n`` the numerical value and :math:`\rho = c\,u\,|f(x)|/h` the rounding
    noise of the difference quotient (``u`` the unit roundoff, ``h`` the step, ``c`` = 4 central,
    12 richardson). Default ``(atol, rtol)``: ``(1e-7, 1e-5)`` when everything is float64,
    ``(1e-3, 1e-2)`` when an input or output is float32. In ``"fast"`` mode each of ``probes``
    random signed direction pairs ``(u, v)`` per output/input block compares
    :math:`u^\top J v` with tolerance ``atol + rtol * ||J v||_2 + rho``; a single Jacobian entry
    wrong by ``d`` shows as exactly ``|d|`` in every Rademacher probe (see the module docstring),
    so fast mode catches it whenever full mode would at tolerance ``atol + rtol * ||J||_F``.
    When a probe fails, the block is compared in full to name the worst element (blocks above
    4M entries are reported by probe).

    Kinks: a mismatching entry whose left and right one-sided differences disagree beyond the
    tolerance at two step sizes (``h`` and ``h/10``: a jump, not curvature) *and* whose
    analytical value lies between them is a non-differentiable point (``relu``/``abs`` at 0,
    ``max`` with ties), not a wrong gradient: with ``kinks="raise"``
    :class:`NonDifferentiablePointError` is raised, with ``kinks="skip"`` the entry is left out
    and listed in ``report.kinks``. Any other mismatch raises :class:`GradientCheckError`.

    Works with ``torch.autograd.Function`` subclasses old-style (``ctx`` in ``forward``) and
    new-style (``setup_context``): what cannot be vmapped is evaluated in a loop. The caller's
    tensors are never modified (``fn`` gets copies; no ``.grad``/``requires_grad`` changes), and
    it works under ``torch.no_grad()``.

    Args:
        fn: function of the input tensors returning a tensor or a tuple/list of tensors.
        *inputs: float32/float64 tensors on one device, every one differentiated (bind other
            arguments with ``functools.partial``).
        order: 1, or 2 to also check second derivatives.
        mode: ``"full"`` (every entry) or ``"fast"`` (random signed directions).
        atol: absolute tolerance (``None``: by dtype, see above).
        rtol: relative tolerance (``None``: by dtype).
        eps: base finite-difference step (``None``: by dtype, see :func:`numerical_jacobian`).
        method: ``"central"`` or ``"richardson"`` finite differences.
        probes: direction pairs per output/input block in fast mode.
        directions: ``"rademacher"`` (random +-1, the default: exact for single-entry errors)
            or ``"gaussian"``.
        seed: seed of the random directions/cotangents; ``None`` draws a fresh one (the global
            torch RNG is not touched). It is printed in error messages and stored in the report.
        kinks: ``"raise"`` or ``"skip"`` (see above).

    Returns:
        A :class:`GradientCheckReport` (always, when nothing failed).

    Raises:
        GradientCheckError: an analytical derivative is wrong. The message names the output and
            input, the worst element's index in each, both values and the tolerance.
        NonDifferentiablePointError: with ``kinks="raise"``, mismatches only at kinks.
        TypeError: ``fn`` not callable, an input not a float32/float64 tensor, ``fn`` returning a
            non-tensor or a non-floating tensor.
        ValueError: inputs on different devices, or a bad option value.
        gradlab.GraphError: ``order=2`` and ``fn``'s backward is not differentiable.

    Example:
        >>> from gradlab.testing import check_gradients, GradientCheckError
        >>> A = torch.randn(4, 3, dtype=torch.float64)
        >>> x = torch.randn(3, dtype=torch.float64)
        >>> report = check_gradients(lambda x: torch.tanh(A @ x), x)
        >>> report.compared, report.margin < 1
        (12, True)
        >>> report = check_gradients(lambda x: torch.tanh(A @ x), x, order=2, mode="fast")
        >>> report.order, report.mode
        (2, 'fast')
        >>> class BadSquare(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x**2
        ...     @staticmethod
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return g * 2.002 * x  # 0.1 % too large
        >>> try:
        ...     check_gradients(BadSquare.apply, torch.tensor([0.5, -2.0, 1.0]).double())
        ... except GradientCheckError as e:
        ...     print(e.location)
        d output 0[1] / d input 0[1]
    """
    check_fn(fn, _CALLER)
    check_choice(order, "order", (1, 2), _CALLER)
    check_choice(mode, "mode", ("full", "fast"), _CALLER)
    check_choice(method, "method", tuple(METHODS), _CALLER)
    check_choice(directions, "directions", ("rademacher", "gaussian"), _CALLER)
    check_choice(kinks, "kinks", ("raise", "skip"), _CALLER)
    if eps is not None:
        check_positive(eps, "eps", _CALLER)
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"{_CALLER}: probes must be a positive int, got {probes!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"{_CALLER}: seed must be an int or None, got {type(seed).__name__}")
    xs = check_inputs(inputs, _CALLER)
    f0 = as_outputs(fn(*xs), _CALLER)
    d_atol, d_rtol = default_tolerances(list(xs) + list(f0))
    st = _Settings(
        mode=mode,
        method=method,
        eps=eps,
        atol=d_atol if atol is None else check_positive(atol, "atol", _CALLER, allow_zero=True),
        rtol=d_rtol if rtol is None else check_positive(rtol, "rtol", _CALLER, allow_zero=True),
        probes=probes,
        directions=directions,
        seed=int.from_bytes(os.urandom(4), "little") if seed is None else seed,
        kinks=kinks,
        order=1,
        unit=machine_eps(least_precise(list(xs) + list(f0))),
    )
    report = _report(_compare(_first_order_problem(fn), xs, st, f0), st, xs, None)
    if order == 1:
        return report
    st.order = 2
    problem = _second_order_problem(fn, xs, st.seed)
    try:
        acc = _compare(problem, xs, st)
    except (GradientCheckError, NonDifferentiablePointError):
        raise
    except Exception as e:
        raise GraphError(
            f"{_CALLER}: order=2 needs fn's backward to be differentiable, but double backward "
            f"failed with {type(e).__name__}: {e}. Make the backward of fn differentiable "
            "(no @once_differentiable, "
            "no .detach()) or check with order=1."
        ) from None
    return _report(acc, st, xs, report)


def _report(
    acc: _Acc, st: _Settings, xs: tuple[torch.Tensor, ...], first: GradientCheckReport | None
) -> GradientCheckReport:
    eps = tuple(st.eps if st.eps is not None else default_step(st.method, x.dtype) for x in xs)
    return GradientCheckReport(
        order=st.order,
        mode=st.mode,
        method=st.method,
        atol=st.atol,
        rtol=st.rtol,
        eps=eps,
        max_abs_error=acc.max_abs,
        max_rel_error=acc.max_rel,
        worst=acc.worst,
        margin=acc.margin,
        compared=acc.compared,
        probes=st.probes if st.mode == "fast" else 0,
        seed=st.seed if (st.mode == "fast" or st.order == 2) else None,
        kinks=tuple(acc.kinks),
        first_order=first,
    )
