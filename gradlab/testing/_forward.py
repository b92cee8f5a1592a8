"""Forward mode for check_gradients(forward_ad=True): Jacobian-vector products of ``fn``.

First choice: :func:`torch.func.jvp` vmapped over the tangents (one batched forward pass; uses
the ``jvp`` staticmethod of new-style ``autograd.Function`` subclasses). Otherwise one tangent at
a time with dual numbers (:mod:`torch.autograd.forward_ad`), which also runs old-style Functions'
``jvp``. A function without forward-mode rules raises :class:`gradlab.GraphError`.

Inputs keep the caller's strides, except expanded ones (a stride 0 with size > 1): a tangent of
such a tensor would have to be expanded too (one tangent per memory location), so forward mode
gets a dense copy of them, with one tangent per element like the finite differences.
"""

from __future__ import annotations

import warnings

import torch
import torch.autograd.forward_ad as fwad

from gradlab._errors import GraphError
from gradlab.testing._analytical import Problem
from gradlab.testing._common import as_outputs, same_layout
from gradlab.testing._report import CALLER

__all__ = ["Forward"]

_COLUMNS_BUDGET = 2**23


def _expanded(x: torch.Tensor) -> bool:
    return any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride()))


class Forward:
    """``J_i v`` for every output ``i`` and a batch of tangents ``v`` of one input."""

    def __init__(
        self, problem: Problem, xs: tuple[torch.Tensor, ...], f0: tuple[torch.Tensor, ...]
    ):
        self.problem = problem
        self.xs = tuple(x.contiguous() if _expanded(x) else x for x in xs)
        self.f0 = f0
        self.use_func = True

    def _func(self, j: int, tangents: torch.Tensor) -> list[torch.Tensor]:
        shape = self.xs[j].shape

        def f(xj: torch.Tensor) -> tuple[torch.Tensor, ...]:
            args = list(self.xs)
            args[j] = xj
            return as_outputs(self.problem.num_fn(*args), CALLER)

        def one(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(
                o.reshape(-1) for o in torch.func.jvp(f, (self.xs[j],), (t.view(shape),))[1]
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = torch.func.vmap(one)(tangents)
        return [o.reshape(tangents.shape[0], -1).detach() for o in outs]

    def _dual(self, j: int, tangents: torch.Tensor) -> list[torch.Tensor]:
        cols: list[list[torch.Tensor]] = [[] for _ in self.f0]
        for t in tangents:
            with fwad.dual_level(), torch.enable_grad():
                # the graph-building form: at order 2 it is forward-over-reverse
                args = [same_layout(x).requires_grad_(True) for x in self.xs]
                args[j] = fwad.make_dual(args[j], t.view(self.xs[j].shape).to(args[j].dtype))
                outs = as_outputs(self.problem.graph_fn(*args), CALLER)
                for i, o in enumerate(outs):
                    tangent = fwad.unpack_dual(o).tangent
                    cols[i].append(
                        torch.zeros(o.numel(), dtype=o.dtype, device=o.device)
                        if tangent is None
                        else tangent.detach().reshape(-1).clone()
                    )
        return [torch.stack(c) for c in cols]

    def columns(self, j: int, tangents: torch.Tensor) -> list[torch.Tensor]:
        """``J_i t`` for each row ``t`` of ``tangents`` (``[B, n_j]``): per output ``[B, m_i]``."""
        if self.use_func:
            try:
                return self._func(j, tangents)
            except Exception:
                self.use_func = False
        try:
            return self._dual(j, tangents)
        except Exception as e:
            raise GraphError(
                f"{CALLER}: forward_ad=True needs forward-mode AD rules for fn, but the "
                f"Jacobian-vector product failed with {type(e).__name__}: {e}. Define jvp (and "
                "setup_context) on the autograd.Function, or pass forward_ad=False."
            ) from None

    def jacobian(self, j: int) -> list[torch.Tensor]:
        """Forward-mode Jacobian blocks w.r.t. input ``j``: per output ``[m_i, n_j]``."""
        x = self.xs[j]
        n = x.numel()
        if n == 0:
            return [o.new_zeros(o.numel(), 0) for o in self.f0]
        width = n + sum(o.numel() for o in self.f0)
        chunk = max(1, _COLUMNS_BUDGET // max(1, width))
        parts = []
        for s in range(0, n, chunk):
            c = min(n, s + chunk) - s
            basis = torch.zeros(c, n, dtype=x.dtype, device=x.device)
            basis[:, s : s + c].diagonal().fill_(1)
            parts.append(self.columns(j, basis))
        return [torch.cat([p[i] for p in parts]).T for i in range(len(self.f0))]
