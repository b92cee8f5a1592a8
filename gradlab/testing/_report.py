"""What check_gradients compared: locations, the report, running maxima, error messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradlab.testing._errors import GradientCheckError

__all__ = [
    "CALLER",
    "Acc",
    "GradientCheckReport",
    "Location",
    "Settings",
    "constant",
    "fmt",
    "raise_wrong",
    "unravel",
]

CALLER = "check_gradients"


@dataclass(frozen=True)
class Location:
    """Where in the Jacobian an entry lives.

    ``output`` indexes ``fn``'s outputs (for ``order=2``: the input whose gradient is
    differentiated), ``input`` the inputs (with ``grad_output=True``, for ``order=2`` only: the
    output whose grad_output is differentiated, as ``gradgradcheck`` does). Indices are those of
    ``fn``'s own arguments and results, also when some are constants or skipped. The elements are
    multi-indices into those tensors, ``None`` when only random directions were compared; for a
    complex tensor the last index is 0 for the real part and 1 for the imaginary part (the layout
    of ``torch.view_as_real``).
    """

    output: int
    input: int
    output_element: tuple[int, ...] | None = None
    input_element: tuple[int, ...] | None = None
    order: int = 1
    grad_output: bool = False

    def __str__(self) -> str:
        out = f"output {self.output}" if self.order == 1 else f"grad[input {self.output}]"
        if self.output_element is not None:
            out += str(list(self.output_element))
        inp = f"grad_output {self.input}" if self.grad_output else f"input {self.input}"
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
        eps: base finite-difference step per differentiated input.
        max_abs_error: largest ``|analytical - numerical|``.
        max_rel_error: largest ``|analytical - numerical| / |numerical|`` over entries with
            ``|numerical| > atol`` (0.0 if none).
        worst: location of ``max_abs_error`` (``None`` if nothing was compared).
        margin: largest ``|analytical - numerical| / tolerance`` (below 1 for a pass).
        compared: number of values compared (Jacobian entries, or probes x blocks).
        probes: random direction pairs per block (0 in full mode).
        seed: seed of the random directions / cotangents / contract probes.
        kinks: entries at non-differentiable points skipped with ``kinks="skip"``.
        first_order: for ``order=2``, the report of the first-order check.
        inputs: indices of the inputs that were differentiated (the others were constants).
        outputs: indices of the outputs that were checked (integer/bool outputs are skipped).
        checks: the consistency checks that ran besides the Jacobian comparison, by name:
            ``"reentrant"``, ``"grad_output scaling"``, ``"undefined grad_outputs"``,
            ``"vmap rule"``, ``"forward mode"``.
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
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    checks: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"gradients OK (order {self.order}, mode {self.mode!r}, {self.method}): "
            f"{self.compared} values, max abs error {self.max_abs_error:.2e}, "
            f"max rel error {self.max_rel_error:.2e}, margin {self.margin:.2g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
            + (f", {len(self.kinks)} kinks skipped" if self.kinks else "")
        )


@dataclass
class Settings:
    """Options of one check_gradients call, and how internal indices map to ``fn``'s own."""

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
    nondet_tol: float = 0.0
    forward_ad: bool = False
    #: ``fn``'s index of each checked output (order 2: of each differentiated input).
    outputs: tuple[int, ...] = ()
    #: ``fn``'s index of each differentiated input; for order 2 followed by the output index of
    #: each grad_output (``n_x`` of them are inputs proper).
    inputs: tuple[int, ...] = ()
    n_x: int = 0
    checks: list[str] = field(default_factory=list)
    #: Seconds of one plain evaluation of fn (fast mode loops its vjps when this is large).
    eval_seconds: float = 0.0

    def loc(
        self,
        i: int,
        j: int,
        out_el: tuple[int, ...] | None = None,
        in_el: tuple[int, ...] | None = None,
    ) -> Location:
        """The :class:`Location` of internal output ``i`` / input ``j`` in ``fn``'s terms."""
        return Location(
            self.outputs[i] if i < len(self.outputs) else i,
            self.inputs[j] if j < len(self.inputs) else j,
            out_el,
            in_el,
            self.order,
            grad_output=self.order == 2 and j >= self.n_x,
        )

    def ran(self, name: str) -> None:
        if name not in self.checks:
            self.checks.append(name)

    def tag(self) -> str:
        seed = f", seed {self.seed}"
        return f"[order {self.order}, mode {self.mode!r}, method {self.method!r}{seed}]"


@dataclass
class Acc:
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


def constant(loc: Location) -> Callable[[int], Location]:
    return lambda k: loc


def unravel(k: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for s in reversed(shape):
        idx.append(k % s)
        k //= s
    return tuple(reversed(idx))


def fmt(x: float) -> str:
    return f"{x:.10g}"


def raise_wrong(
    loc: Location,
    analytical: float,
    numerical: float,
    diff: float,
    tol: float,
    scale: float,
    mismatches: int | None,
    total: int,
    st: Settings,
    *,
    kinks: int = 0,
    probe: str = "",
    forward: bool = False,
) -> None:
    """Raise :class:`GradientCheckError` for a wrong entry (or probe) with every number."""
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
    kind = "forward-mode (jvp) " if forward else ""
    fix = (
        "Fix the forward-mode rule (jvp) of fn"
        if forward
        else ("Fix the double backward of fn" if st.order == 2 else "Fix the backward of fn")
    )
    raise GradientCheckError(
        f"{CALLER}: wrong {kind}{'second ' if st.order == 2 else ''}derivative {loc}{probe}: "
        f"analytical {what} {fmt(analytical)} vs numerical {fmt(numerical)}, "
        f"|difference| {diff:.3e} > tolerance {tol:.3e} (atol {st.atol:g} + rtol {st.rtol:g} * "
        f"{scale_name} {scale:.3g} + rounding {max(rounding, 0.0):.2g}){count}. "
        f"{st.tag()} {fix}; if the finite differences are inaccurate here, pass "
        "method='richardson' or larger atol/rtol.",
        location=loc,
        analytical=analytical,
        numerical=numerical,
        tolerance=tol,
        mismatches=mismatches,
    )
