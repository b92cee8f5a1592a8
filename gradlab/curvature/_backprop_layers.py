"""Per-sample curvature and its propagation through layers, for :mod:`._backprop`.

:class:`_Curvature` holds the per-sample Hessians of the loss w.r.t. one activation of a chunk of
samples, factored or full; :class:`_LayerOp` (one per supported layer type, registered in
``_OPS``) applies a layer's transposed map to it and gives the Hessian diagonals of the layer's
weight and bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.grad import conv2d_input


def _weight(module: nn.Module) -> torch.Tensor:
    w = module._parameters["weight"]
    assert w is not None
    return w.detach()


class _Curvature:
    """Per-sample Hessians of a chunk of n samples w.r.t. one activation of width d.

    Either ``full`` (n, d, d), or the sum of three terms: the loss term ``A M A^T`` (A of shape
    (d, n or 1, m): the transposed Jacobian of the output, M (n, m, m): the loss Hessian), the
    residual terms ``B diag(s) B^T`` (B (d, n, k), s (n, k) of +-1) and ``diag(r)`` (n, d).
    Factors keep the feature dimension first, so that a linear layer is one matrix product.
    """

    def __init__(
        self,
        *,
        full: torch.Tensor | None = None,
        A: torch.Tensor | None = None,
        M: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ):
        self.full, self.A, self.M, self.B, self.s, self.r = full, A, M, B, s, r

    @classmethod
    def output(cls, H: torch.Tensor, root: bool) -> _Curvature:
        """At the chain's output: A = I, M = the per-sample loss Hessians H (n, C, C); or,
        with ``root``, A = H a square root of them (H H^T) and M = I (``None``)."""
        if root:
            return cls(A=H.transpose(0, 1))
        eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
        return cls(A=eye.unsqueeze(1), M=H)

    def diag(self) -> torch.Tensor:
        if self.full is not None:
            return self.full.diagonal(dim1=1, dim2=2)
        assert self.A is not None
        if self.M is None:
            out = (self.A * self.A).sum(-1).T
        else:
            A = self.A.transpose(0, 1)  # (n, d, m)
            out = ((A @ self.M) * A).sum(-1)
        if self.B is not None:
            out = out + torch.einsum("dnk,nk->nd", self.B * self.B, self.s)
        return out if self.r is None else out + self.r

    def scale(self, d1: torch.Tensor, residual: torch.Tensor | None) -> _Curvature:
        """D H D + diag(residual), D = diag(d1)."""
        if self.full is not None:
            full = d1.unsqueeze(2) * self.full * d1.unsqueeze(1)
            if residual is not None:
                full.diagonal(dim1=1, dim2=2).add_(residual)
            return _Curvature(full=full)
        assert self.A is not None
        col = d1.T.unsqueeze(2)
        B = None if self.B is None else self.B * col
        r = None if self.r is None else self.r * d1 * d1
        if residual is not None:
            r = residual if r is None else r + residual
        return _Curvature(A=self.A * col, M=self.M, B=B, s=self.s, r=r)

    def to_full(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        assert self.A is not None
        A = self.A.transpose(0, 1)
        full = (A if self.M is None else A @ self.M) @ A.mT
        if self.B is not None:
            B = self.B.transpose(0, 1)
            full = full + (B * self.s.unsqueeze(1)) @ B.mT  # type: ignore[union-attr]
        if self.r is not None:
            full.diagonal(dim1=1, dim2=2).add_(self.r)
        return full

    def width_after(self) -> int:
        """Factor width after a linear layer (the residual diagonal adds d columns)."""
        assert self.A is not None
        d, m = self.A.shape[0], self.A.shape[2]
        return m + (0 if self.B is None else self.B.shape[2]) + (0 if self.r is None else d)

    def back(self, op: _LayerOp) -> _Curvature:
        """W^T H W for a layer z = W x + b (``op`` applies W^T)."""
        if self.full is None and self.width_after() < op.d_in:
            assert self.A is not None
            B, s = (None, None) if self.B is None else (op.left(self.B), self.s)
            if self.r is not None:
                B_r = op.dense().unsqueeze(1) * self.r.abs().sqrt().unsqueeze(0)
                B = B_r if B is None else torch.cat([B, B_r], dim=2)
                s = self.r.sign() if s is None else torch.cat([s, self.r.sign()], dim=1)
            return _Curvature(A=op.left(self.A), M=self.M, B=B, s=s)
        WT = op.dense()
        return _Curvature(full=WT @ self.to_full() @ WT.T)

    def factored(self) -> _Curvature:
        """The same curvature with the full matrix as the loss-term factor (A = I)."""
        if self.full is None:
            return self
        eye = torch.eye(self.full.shape[1], dtype=self.full.dtype, device=self.full.device)
        return _Curvature(A=eye.unsqueeze(1), M=self.full)


class _LayerOp:
    """One recorded call of a parametrised layer z = W x + b, per sample (features flattened)."""

    rows: int  # samples: rows of the flattened input
    d_in: int
    d_out: int

    def left(self, F: torch.Tensor) -> torch.Tensor:
        """W^T applied to the columns of F of shape (d_out, n, m): (d_in, n, m)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """W^T as a (d_in, d_out) matrix."""
        raise NotImplementedError

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Hessian diagonals of weight and bias from samples lo:hi, curvature at the output."""
        raise NotImplementedError

    def grad_back(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient (n, d_out) at the output -> (n, d_in) at the input."""
        return self.left(g.T.unsqueeze(2)).squeeze(2).T


class _LinearOp(_LayerOp):
    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        self.W = _weight(module)
        self.d_out, self.d_in = self.W.shape
        self.rows = inp.numel() // self.d_in
        self.x = inp.detach().reshape(self.rows, self.d_in)

    def left(self, F: torch.Tensor) -> torch.Tensor:
        d, n, m = F.shape
        return (self.W.T @ F.reshape(d, n * m)).reshape(self.d_in, n, m)

    def dense(self) -> torch.Tensor:
        return self.W.T

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        x = self.x[lo:hi]
        dz = curv.diag()
        return {"weight": dz.T @ (x * x), "bias": dz.sum(0)}

    def grad_back(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.W


class _ConvOp(_LayerOp):
    """nn.Conv2d (groups 1, zero padding): W^T by ``conv2d_input``, weight diagonals from the
    unfolded input (``F.unfold``), as in BackPACK's convolution extensions."""

    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        m = module
        assert isinstance(m, nn.Conv2d)
        x = inp.detach()
        self.x = x if x.dim() == 4 else x.unsqueeze(0)
        self.rows = self.x.shape[0]
        self.W = _weight(m)
        self.in_shape = tuple(self.x.shape[1:])
        self.out_shape = tuple(out.shape[-3:])
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        self.padding = (0, 0) if isinstance(m.padding, str) else m.padding
        self.stride, self.dilation = m.stride, m.dilation
        self._dense: torch.Tensor | None = None

    def left(self, F: torch.Tensor) -> torch.Tensor:
        _, n, m = F.shape
        grad = F.permute(1, 2, 0).reshape(n * m, *self.out_shape)
        x = conv2d_input(
            (n * m, *self.in_shape), self.W, grad, self.stride, self.padding, self.dilation
        )
        return x.reshape(n, m, self.d_in).permute(2, 0, 1)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            eye = torch.eye(self.d_out, dtype=self.W.dtype, device=self.W.device)
            self._dense = self.left(eye.unsqueeze(1)).squeeze(1)
        return self._dense

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        curv = curv.factored()
        assert curv.A is not None
        X = nn.functional.unfold(
            self.x[lo:hi], self.W.shape[2:], self.dilation, self.padding, self.stride
        )  # (n, J, P)
        n, C_out, P = X.shape[0], self.out_shape[0], X.shape[2]
        A = curv.A.reshape(C_out, P, curv.A.shape[1], -1).expand(-1, -1, n, -1)
        G = torch.einsum("opna,njp->noja", A, X)
        gb = A.sum(1)
        if curv.M is None:
            weight, bias = (G * G).sum((0, 3)), (gb * gb).sum((1, 2))
        else:
            weight = (torch.einsum("noja,nab->nojb", G, curv.M) * G).sum((0, 3))
            bias = torch.einsum("ona,nab,onb->o", gb, curv.M, gb)
        if curv.B is not None:
            B = curv.B.reshape(C_out, P, n, -1)
            GB = torch.einsum("opnk,njp->nojk", B, X)
            weight = weight + torch.einsum("nojk,nk->oj", GB * GB, curv.s)
            bb = B.sum(1)
            bias = bias + torch.einsum("onk,nk->o", bb * bb, curv.s)
        if curv.r is not None:
            r = curv.r.reshape(n, C_out, P)
            weight = weight + torch.einsum("nop,njp->oj", r, X * X)
            bias = bias + r.sum((0, 2))
        return {"weight": weight.reshape(self.W.shape), "bias": bias}


# Modules whose weight (and bias) take the fast path, and their per-sample maps.
_OPS: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor, torch.Tensor], _LayerOp]] = {
    nn.Linear: _LinearOp,
    nn.Conv2d: _ConvOp,
}
