"""Finite-difference Jacobians, evaluated in one batch where the function allows it.

:func:`numerical_jacobian` perturbs every element of every input and evaluates the function at
all perturbed points at once with :func:`torch.func.vmap` (chunked to bound memory). Functions
that cannot be vmapped (an old-style ``torch.autograd.Function`` without ``setup_context``, one
without a vmap rule, a function that calls ``.item()`` or branches on tensor values) are evaluated
point by point in a Python loop instead; the result is the same, only slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

import gradlab._validate as v
from gradlab.testing._common import (
    METHODS,
    as_outputs,
    check_fn,
    check_inputs,
    default_step,
)

__all__ = ["numerical_jacobian"]

#: Elements (rows x (input + output size)) evaluated per batch; bounds the memory of one chunk.
_BATCH_BUDGET = 2**23


class Evaluator:
    """Evaluates ``fn`` at displaced copies of one input, batched with vmap or in a loop.

    ``loop_fn`` (default ``fn``) is used for the loop fallback; it may differ from ``fn`` when the
    vmappable formulation of a function is not the one that works without vmap (order 2 checks).
    ``check_base(j, outputs)``, if given, receives ``fn``'s vmapped outputs at the unperturbed
    point, evaluated as one extra row of the first vmapped batch for input ``j`` (and may raise).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        xs: tuple[torch.Tensor, ...],
        caller: str,
        *,
        loop_fn: Callable[..., Any] | None = None,
        chunk_size: int | None = None,
        f0: tuple[torch.Tensor, ...] | None = None,
        check_base: Callable[[int, list[torch.Tensor]], None] | None = None,
    ) -> None:
        self.fn = fn
        self.loop_fn = loop_fn or fn
        self.xs = xs
        self.caller = caller
        self.chunk_size = chunk_size
        self.use_vmap = True
        self.calls = 0
        self.check_base = check_base
        self._based: set[int] = set()
        self._last_vmapped = False
        if f0 is None:  # fn's outputs at xs, unless the caller has them already
            f0 = as_outputs(self.loop_fn(*xs), caller)
        self.f0 = tuple(o.detach() for o in f0)
        self.out_sizes = [o.numel() for o in self.f0]

    def rows_per_chunk(self, j: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        width = self.xs[j].numel() + sum(self.out_sizes)
        return max(1, _BATCH_BUDGET // max(1, width))

    def wants_base(self, j: int) -> bool:
        """Whether the next batch for input ``j`` should carry the unperturbed point."""
        return self.check_base is not None and self.use_vmap and j not in self._based

    def displaced(self, j: int, disp: torch.Tensor) -> list[torch.Tensor]:
        """``fn`` at ``xs`` with ``xs[j] += disp[b]`` for each row ``b``: per output [B, m_i]."""
        base = self.wants_base(j)
        if base:
            disp = torch.cat([disp, disp.new_zeros(1, disp.shape[1])])
        return self.points(j, self.xs[j].reshape(1, -1) + disp, base=base)

    def points(self, j: int, pts: torch.Tensor, *, base: bool = False) -> list[torch.Tensor]:
        """``fn`` with ``xs[j]`` replaced by each row of ``pts`` ([B, n_j]): per output [B, m_i].

        ``base``: the last row of ``pts`` is the unperturbed point; its outputs go to
        ``check_base`` (if it was evaluated under vmap) and are left out of the result.
        """
        chunk = self.rows_per_chunk(j)
        if pts.shape[0] <= chunk:
            out = self._batch(j, pts)
        else:
            parts = [self._batch(j, pts[s : s + chunk]) for s in range(0, pts.shape[0], chunk)]
            out = [torch.cat([p[i] for p in parts]) for i in range(len(self.f0))]
        if base:
            if self._last_vmapped and self.check_base is not None and j not in self._based:
                self._based.add(j)
                self.check_base(j, [o[-1] for o in out])
            out = [o[:-1] for o in out]
        return out

    def _batch(self, j: int, pts: torch.Tensor) -> list[torch.Tensor]:
        self._last_vmapped = False
        if self.use_vmap:
            try:
                out = self._vmapped(j, pts)
                self._last_vmapped = True
                return out
            except Exception:
                self.use_vmap = False  # e.g. no vmap rule, .item(), data-dependent control flow
        return self._looped(j, pts)

    def _vmapped(self, j: int, pts: torch.Tensor) -> list[torch.Tensor]:
        shape = self.xs[j].shape

        def one(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
            args = list(self.xs)
            args[j] = p.view(shape)
            outs = as_outputs(self.fn(*args), self.caller)
            return tuple(o.detach().reshape(-1) for o in outs)

        self.calls += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "performance drop ... batching rule" notices
            outs = torch.func.vmap(one)(pts)
        return [o.reshape(pts.shape[0], -1) for o in outs]

    def _looped(self, j: int, pts: torch.Tensor) -> list[torch.Tensor]:
        rows: list[list[torch.Tensor]] = [[] for _ in self.f0]
        for p in pts:
            args = list(self.xs)
            xj = self.xs[j].clone()  # keeps the caller's strides (non-contiguous layouts)
            xj.copy_(p.view(xj.shape))
            args[j] = xj
            self.calls += 1
            for i, o in enumerate(as_outputs(self.loop_fn(*args), self.caller)):
                rows[i].append(o.detach().reshape(-1))
        return [torch.stack(r) for r in rows]


def steps_for(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Nominal step per element of ``x``: ``eps * max(1, |x_k|)``, flattened."""
    return eps * x.detach().reshape(-1).abs().clamp(min=1.0)


def exact_delta(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The displacement actually applied when ``step`` is added to ``x`` in its dtype."""
    flat = x.reshape(-1)
    return (flat + step) - flat


def fd_block(
    ev: Evaluator, j: int, start: int, stop: int, step: torch.Tensor, method: str
) -> list[torch.Tensor]:
    """Finite-difference derivatives w.r.t. elements ``start:stop`` of input ``j``.

    All perturbed points (``+h`` and ``-h``, and ``h/2`` for Richardson) are built in one
    ``[levels * 2 * c, n_j]`` batch (the input repeated, then one diagonal add per sign) and
    evaluated in one call. Returns, per output ``i``, the transposed block ``[c, m_i]``: row
    ``k`` is the column ``start + k`` of the Jacobian.
    """
    x = ev.xs[j].reshape(-1)
    c, n = stop - start, x.numel()
    levels = [1.0] if method == "central" else [1.0, 0.5]
    xc = x[start:stop]
    # One more row, left unperturbed, when the evaluator checks fn's vmapped value there.
    base = ev.wants_base(j)
    rows = 2 * len(levels) * c
    buf = x.expand(rows + int(base), n).clone()
    pts = buf[:rows].view(2 * len(levels), c, n)
    denoms = []
    for k, level in enumerate(levels):
        h = step[start:stop] * level
        plus, minus = exact_delta(xc, h), exact_delta(xc, -h)
        pts[2 * k, :, start:stop].diagonal().add_(plus)
        pts[2 * k + 1, :, start:stop].diagonal().add_(minus)
        denoms.append((plus - minus).unsqueeze(1))
    f = ev.points(j, buf, base=base)
    result = []
    for fi in f:
        # Contiguous [c, m_i] results whatever layout fn's batched output has.
        d1 = _sub(fi[:c], fi[c : 2 * c]).div_(denoms[0])
        if method == "richardson":
            d2 = _sub(fi[2 * c : 3 * c], fi[3 * c :]).div_(denoms[1])
            d1 = d2.mul_(4.0).sub_(d1).div_(3.0)
        result.append(d1)
    return result


def _sub(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # p - q in the operands' layout, then one copy if that is not row-major (a 2-D transpose
    # copy is much faster than a subtraction that writes transposed).
    return (p - q).contiguous()


def fd_jacobian(
    ev: Evaluator, eps: float | None, method: str
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """All finite-difference blocks ``[i][j]`` (``[m_i, n_j]``) and the nominal steps per input."""
    blocks: list[list[torch.Tensor]] = [[] for _ in ev.f0]
    steps = []
    for j, x in enumerate(ev.xs):
        step = steps_for(x, eps if eps is not None else default_step(method, x.dtype))
        steps.append(step)
        for i, b in enumerate(fd_transposed(ev, j, step, method)):
            blocks[i].append(b.T.contiguous().to(ev.f0[i].dtype))
    return blocks, steps


def fd_transposed(ev: Evaluator, j: int, step: torch.Tensor, method: str) -> list[torch.Tensor]:
    """Every finite-difference column w.r.t. input ``j``: per output the ``[n_j, m_i]`` block."""
    n = ev.xs[j].numel()
    if n == 0:
        return [o.new_zeros(0, o.numel()) for o in ev.f0]
    chunk = max(1, ev.rows_per_chunk(j) // METHODS[method])
    parts = [fd_block(ev, j, s, min(n, s + chunk), step, method) for s in range(0, n, chunk)]
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[i] for p in parts]) for i in range(len(ev.f0))]


def numerical_jacobian(
    fn: Callable[..., Any],
    *inputs: torch.Tensor,
    eps: float | None = None,
    method: Literal["central", "richardson"] = "central",
    chunk_size: int | None = None,
) -> tuple[tuple[torch.Tensor, ...], ...]:
    r"""Jacobian of ``fn`` at ``inputs`` by finite differences, all points evaluated in one batch.

    Element ``k`` of input ``j`` is perturbed by the step :math:`h_k = \epsilon\max(1, |x_k|)`
    (the displacement actually representable in the input's dtype is used as denominator) and

    * ``"central"``: :math:`D(h) = \frac{f(x + h e_k) - f(x - h e_k)}{2h}`, error
      :math:`O(h^2)`;
    * ``"richardson"``: :math:`\frac{4 D(h/2) - D(h)}{3}`, error :math:`O(h^4)` for twice the
      evaluations, the better choice in float32.

    Default ``eps`` per input dtype: central 5e-6 (float64) / 5e-3 (float32), richardson
    1e-3 / 3e-2. All perturbed points of one input are evaluated with :func:`torch.func.vmap`
    (in chunks of at most ``chunk_size`` points); if ``fn`` cannot be vmapped (old-style
    ``autograd.Function``, no vmap rule, ``.item()``, value-dependent Python branches) the points
    are evaluated one by one instead, which gives the same result. In the vmap path ``fn`` sees a
    contiguous batched tensor; in the loop path it sees copies with the caller's strides.

    Args:
        fn: function of the input tensors returning a tensor or a tuple/list of tensors.
        *inputs: floating-point tensors (float32 or float64) on one device. They are never
            modified; ``fn`` is called on copies.
        eps: base step (see above); ``None`` picks it per dtype and method.
        method: ``"central"`` or ``"richardson"``.
        chunk_size: points evaluated per vmap call (``None``: about 8M elements per batch).

    Returns:
        A tuple over outputs of tuples over inputs: ``J[i][j]`` is the 2-D block
        ``[outputs[i].numel(), inputs[j].numel()]`` with
        ``J[i][j][r, c] = d outputs[i].flatten()[r] / d inputs[j].flatten()[c]``
        (row-major element order, whatever the strides). The structure is always this, also for
        one input and one output.

    Raises:
        TypeError: ``fn`` is not callable, an input is not a floating tensor, or ``fn`` does not
            return floating tensors.
        ValueError: inputs on different devices, or a bad ``eps``/``method``/``chunk_size``.

    Example:
        >>> from gradlab.testing import numerical_jacobian
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> ((J,),) = numerical_jacobian(torch.sin, x)
        >>> J.shape
        torch.Size([2, 2])
        >>> torch.allclose(J, torch.diag(x.cos()), atol=1e-9)
        True
        >>> A = torch.randn(3, 2, dtype=torch.float64)
        >>> blocks = numerical_jacobian(lambda a, v: (a @ v, v.sum()), A, x, method="richardson")
        >>> [tuple(b.shape) for row in blocks for b in row]
        [(3, 6), (3, 2), (1, 6), (1, 2)]
    """
    caller = "numerical_jacobian"
    check_fn(fn, caller)
    v.check_choice(caller, "method", method, tuple(METHODS))
    if eps is not None:
        eps = v.check_positive(caller, "eps", eps)
    if chunk_size is not None:
        chunk_size = v.check_int(
            caller, "chunk_size", chunk_size, minimum=1, fix="Pass an int >= 1, or None for all"
        )
    xs = check_inputs(inputs, caller)
    ev = Evaluator(fn, xs, caller, chunk_size=chunk_size)
    blocks, _ = fd_jacobian(ev, eps, method)
    return tuple(tuple(row) for row in blocks)
