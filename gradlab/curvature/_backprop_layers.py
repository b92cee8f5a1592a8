"""Per-sample curvature and its propagation through layers, for :mod:`._backprop`.

:class:`_Curvature` holds the per-sample Hessians of the loss w.r.t. one activation of a chunk of
samples, factored or full; :class:`_LayerOp` (one per supported layer type, registered in
``_OPS``) applies a layer's transposed map to it and, for a layer with parameters, gives the
Hessian diagonals of its weight and bias. Pooling layers are maps without parameters whose second
derivative is zero (average pooling is linear, max pooling piecewise linear): they only pass the
curvature on.

Layout: samples first, then a factor's columns, then the features, ``(n, m, d)``. A linear
layer's transposed map is then one matrix product on the last dimension, a convolution's one
``conv_transpose2d`` on the ``n * m`` columns viewed as images, and a convolution's per-sample
weight gradients one batched product with the unfolded input, all without copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gradlab.curvature._layers import patches


def _weight(module: nn.Module) -> torch.Tensor:
    w = module._parameters["weight"]
    assert w is not None
    return w.detach()


class _Curvature:
    """Per-sample Hessians of a chunk of n samples w.r.t. one activation of width d.

    Either ``full`` (n, d, d), or the sum of three terms: the loss term ``A^T M A`` per sample
    (A of shape (n or 1, m, d): the factor's m columns, M (n, m, m) the loss Hessian, or ``None``
    for the identity when A is a square root of it), the residual terms ``B^T diag(s) B``
    (B (n, k, d), s (n, k) of +-1) and ``diag(r)`` (n, d).
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
        """At the chain's output: with ``root``, ``H`` (n, m, C) holds m columns of a square
        root of the per-sample loss Hessians (``sum_a H[n, a, i] H[n, a, j]``); else ``H``
        (n, C, C) are the loss Hessians themselves, and A = I."""
        if root:
            return cls(A=H)
        eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
        return cls(A=eye.unsqueeze(0), M=H)

    def diag(self) -> torch.Tensor:
        """The diagonals of the per-sample Hessians, (n, d)."""
        if self.full is not None:
            return self.full.diagonal(dim1=1, dim2=2)
        assert self.A is not None
        if self.M is None:
            out = (self.A * self.A).sum(1)
        else:
            out = ((self.M @ self.A) * self.A).sum(1)
        if self.B is not None:
            out = out + torch.einsum("nkd,nk->nd", self.B * self.B, self.s)
        return out if self.r is None else out + self.r

    def scale(self, d1: torch.Tensor, residual: torch.Tensor | None) -> _Curvature:
        """D H D + diag(residual), D = diag(d1), d1 (n, d)."""
        if self.full is not None:
            full = d1.unsqueeze(2) * self.full * d1.unsqueeze(1)
            if residual is not None:
                full.diagonal(dim1=1, dim2=2).add_(residual)
            return _Curvature(full=full)
        assert self.A is not None
        col = d1.unsqueeze(1)
        B = None if self.B is None else self.B * col
        r = None if self.r is None else self.r * d1 * d1
        if residual is not None:
            r = residual if r is None else r + residual
        return _Curvature(A=self.A * col, M=self.M, B=B, s=self.s, r=r)

    def to_full(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        assert self.A is not None
        A = self.A
        full = A.mT @ (A if self.M is None else self.M @ A)
        if self.B is not None:
            B = self.B
            full = full + B.mT @ (self.s.unsqueeze(2) * B)  # type: ignore[union-attr]
        if self.r is not None:
            full.diagonal(dim1=1, dim2=2).add_(self.r)
        return full

    def width_after(self) -> int:
        """Factor width after a layer (the residual diagonal adds d columns)."""
        assert self.A is not None
        m, d = self.A.shape[1], self.A.shape[2]
        return m + (0 if self.B is None else self.B.shape[1]) + (0 if self.r is None else d)

    def back(self, op: _LayerOp, lo: int, hi: int) -> _Curvature:
        """J^T H J for a layer with Jacobian J (samples lo:hi), kept factored while narrower."""
        if self.full is None and self.width_after() < op.d_in:
            assert self.A is not None
            B, s = (None, None) if self.B is None else (op.left(self.B, lo, hi), self.s)
            if self.r is not None:
                B_r = op.residual_columns(self.r, lo, hi)
                B = B_r if B is None else torch.cat([B, B_r], dim=1)
                s = self.r.sign() if s is None else torch.cat([s, self.r.sign()], dim=1)
            return _Curvature(A=op.left(self.A, lo, hi), M=self.M, B=B, s=s)
        return _Curvature(full=op.full_back(self.to_full(), lo, hi))

    def factored(self) -> _Curvature:
        """The same curvature with the full matrix as the loss-term factor (A = I)."""
        if self.full is None:
            return self
        eye = torch.eye(self.full.shape[1], dtype=self.full.dtype, device=self.full.device)
        return _Curvature(A=eye.unsqueeze(0), M=self.full)


class _LayerOp:
    """One recorded call of a layer z = J x (+ b), per sample (features flattened)."""

    rows: int  # samples: rows of the flattened input
    d_in: int
    d_out: int

    def left(self, F: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """J^T applied to each of F's columns, F (n or 1, m, d_out) -> (n or 1, m, d_in) (1
        only for a layer whose J is the same for every sample); the n samples are lo:hi."""
        raise NotImplementedError

    def residual_columns(self, r: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Columns B (n, d_out, d_in) with ``B^T diag(sign r) B = J^T diag(r) J`` per sample."""
        eye = torch.eye(self.d_out, dtype=r.dtype, device=r.device)
        return self.left(eye * r.abs().sqrt().unsqueeze(2), lo, hi)

    def full_back(self, full: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """J^T H J per sample, H (n, d_out, d_out) -> (n, d_in, d_in)."""
        half = self.left(full.mT, lo, hi)  # [n, j, :] = J^T H[:, j]
        return self.left(half.mT, lo, hi)  # (J^T H J)^T, symmetric

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Hessian diagonals of weight and bias from samples lo:hi, curvature at the output."""
        return {}

    def grad_back(self, g: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Gradient (n, d_out) at the output -> (n, d_in) at the input."""
        return self.left(g.unsqueeze(1), lo, hi).squeeze(1)


class _SharedOp(_LayerOp):
    """A layer whose Jacobian is the same for every sample: J as a matrix (d_out, d_in)."""

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def residual_columns(self, r: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return self.matrix() * r.abs().sqrt().unsqueeze(2)

    def full_back(self, full: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        J = self.matrix()
        return J.T @ full @ J


class _LinearOp(_SharedOp):
    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        self.W = _weight(module)
        self.d_out, self.d_in = self.W.shape
        self.rows = inp.numel() // self.d_in
        self.x = inp.detach().reshape(self.rows, self.d_in)

    def left(self, F: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return F @ self.W

    def matrix(self) -> torch.Tensor:
        return self.W

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        x = self.x[lo:hi]
        dz = curv.diag()
        return {"weight": dz.T @ (x * x), "bias": dz.sum(0)}

    def grad_back(self, g: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return g @ self.W


def _images(inp: torch.Tensor) -> torch.Tensor:
    x = inp.detach()
    return x if x.dim() == 4 else x.unsqueeze(0)


class _ConvOp(_SharedOp):
    """nn.Conv2d (groups 1, zero padding): J^T by ``conv_transpose2d`` on all columns at once,
    weight diagonals from the unfolded input (:func:`~gradlab.curvature._layers.patches`), as in
    BackPACK's convolution extensions."""

    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        m = module
        assert isinstance(m, nn.Conv2d)
        self.x = _images(inp)
        self.rows = self.x.shape[0]
        self.W = _weight(m)
        self.in_shape = tuple(self.x.shape[1:])
        self.out_shape = tuple(out.shape[-3:])
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        self.padding = (0, 0) if isinstance(m.padding, str) else m.padding
        self.stride, self.dilation = m.stride, m.dilation
        # the rows and columns the strided convolution did not reach
        self.output_padding = tuple(
            size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, o, s, p, d, k in zip(
                self.in_shape[1:],
                self.out_shape[1:],
                self.stride,
                self.padding,
                self.dilation,
                self.W.shape[2:],
            )
        )
        self._matrix: torch.Tensor | None = None

    def left(self, F: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        n, m, _ = F.shape
        x = nn.functional.conv_transpose2d(
            F.reshape(n * m, *self.out_shape),
            self.W,
            None,
            self.stride,
            self.padding,
            self.output_padding,
            1,
            self.dilation,
        )
        return x.reshape(n, m, self.d_in)

    def matrix(self) -> torch.Tensor:
        if self._matrix is None:
            eye = torch.eye(self.d_out, dtype=self.W.dtype, device=self.W.device)
            self._matrix = self.left(eye.unsqueeze(0), 0, 1).squeeze(0)
        return self._matrix

    def diagonals(self, curv: _Curvature, lo: int, hi: int) -> dict[str, torch.Tensor]:
        curv = curv.factored()
        assert curv.A is not None
        X = patches(
            self.x[lo:hi], self.W.shape[2:], self.dilation, self.padding, self.stride
        )  # (n, J, P)
        n, (C_out, P), Xt = X.shape[0], (self.out_shape[0], X.shape[2]), X.transpose(1, 2)

        def weights(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Per sample and column, the weight and bias gradients: (n, k, C_out, J), (n, k,
            C_out), from F (n or 1, k, C_out * P)."""
            k = F.shape[1]
            Fn = F.expand(n, k, -1).reshape(n, k * C_out, P)
            return (Fn @ Xt).reshape(n, k, C_out, -1), Fn.reshape(n, k, C_out, P).sum(3)

        G, gb = weights(curv.A)
        if curv.M is None:
            weight, bias = (G * G).sum((0, 1)), (gb * gb).sum((0, 1))
        else:
            m = G.shape[1]
            MG = (curv.M @ G.reshape(n, m, -1)).reshape(G.shape)
            weight = (MG * G).sum((0, 1))
            bias = ((curv.M @ gb) * gb).sum((0, 1))
        if curv.B is not None:
            GB, bb = weights(curv.B)
            weight = weight + torch.einsum("nkoj,nk->oj", GB * GB, curv.s)
            bias = bias + torch.einsum("nko,nk->o", bb * bb, curv.s)
        if curv.r is not None:
            r = curv.r.reshape(n, C_out, P)
            weight = weight + torch.einsum("nop,njp->oj", r, X * X)
            bias = bias + r.sum((0, 2))
        return {"weight": weight.reshape(self.W.shape), "bias": bias}


class _PoolOp(_LayerOp):
    """A pooling layer (no parameters, zero second derivative): average pooling (linear, J^T by
    autograd on the pooling of a zero input, all columns as one batch), max pooling (J^T
    scatters each output's entry to its argmax, found once per call)."""

    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        self.module = module
        self.x = _images(inp)
        self.rows = self.x.shape[0]
        self.in_shape = tuple(self.x.shape[1:])
        self.out_shape = tuple(out.shape[-3:])
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        self.index: torch.Tensor | None = None  # max pooling: flat input index of each output
        if isinstance(module, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
            with torch.no_grad():
                if isinstance(module, nn.MaxPool2d):
                    _, idx = nn.functional.max_pool2d(
                        self.x,
                        module.kernel_size,
                        module.stride,
                        module.padding,
                        module.dilation,
                        module.ceil_mode,
                        return_indices=True,
                    )
                else:
                    _, idx = nn.functional.adaptive_max_pool2d(
                        self.x, self.out_shape[1:], return_indices=True
                    )
            C, plane = self.in_shape[0], self.in_shape[1] * self.in_shape[2]
            offsets = torch.arange(C, device=idx.device).reshape(1, C, 1, 1) * plane
            self.index = (idx + offsets).reshape(self.rows, self.d_out)

    def left(self, F: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        n, m = hi - lo, F.shape[1]
        F = F.expand(n, m, self.d_out)
        if self.index is not None:
            index = self.index[lo:hi].unsqueeze(1).expand(n, m, self.d_out)
            return F.new_zeros(n, m, self.d_in).scatter_add_(2, index, F)
        with torch.enable_grad():
            z = F.new_zeros(n * m, *self.in_shape, requires_grad=True)
            # the module's forward, not __call__: the user's hooks do not fire again
            (x,) = torch.autograd.grad(self.module.forward(z), z, F.reshape(n * m, *self.out_shape))
        return x.reshape(n, m, self.d_in)


# Modules on the fast path, and their per-sample maps (a type with parameters is a *layer* whose
# weight and bias get diagonals; pooling only passes the curvature on).
_OPS: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor, torch.Tensor], _LayerOp]] = {
    nn.Linear: _LinearOp,
    nn.Conv2d: _ConvOp,
    nn.MaxPool2d: _PoolOp,
    nn.AvgPool2d: _PoolOp,
    nn.AdaptiveAvgPool2d: _PoolOp,
    nn.AdaptiveMaxPool2d: _PoolOp,
}
