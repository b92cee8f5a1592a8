r"""Exact Hessian diagonal by Hessian backpropagation through a chain of layers.

:func:`exact_diagonal` runs ``loss_fn`` once with forward hooks that record the calls of the
supported modules, checks that the parameters sit in a *chain* of such modules whose output is
all the loss depends on, and then propagates the per-sample Hessian of the loss w.r.t. the
chain's output backwards through the chain (Dangel, Harmeling, Hennig, *Modular Block-diagonal
Curvature Approximations for Feedforward Architectures*, AISTATS 2020; Mizutani & Dreyfus 2008).
The result is the exact diagonal, not an approximation: the activations' second-derivative terms
are kept.

Fast path (everything else: ``None``, and the caller falls back to Hessian-vector products):

* parameters: the ``weight`` and ``bias`` of ``nn.Linear`` modules (any leading dimensions; every
  row of the flattened leading dimensions is a *sample*);
* between them: element-wise activation modules (``ReLU``, ``ReLU6``, ``LeakyReLU``,
  ``Hardtanh``, ``Hardsigmoid``, ``Hardswish``, ``Sigmoid``, ``Tanh``, ``ELU``, ``SELU``,
  ``CELU``, ``GELU``, ``SiLU``, ``Mish``, ``Softplus``, ``LogSigmoid``, ``Softsign``,
  ``Tanhshrink``; in-place variants too), ``Dropout`` in eval mode, and modules that return their
  input (``Identity``);
* the chain: each module's input is the previous module's output (the same tensor object,
  unmodified); the first parametrised module's input does not depend on ``params``; each listed
  parameter belongs to exactly one call of one chain module; the chain's modules may also hold
  parameters not in ``params`` (constants then);
* the loss: any function of the chain's output that is *separable over samples* (a sum of
  per-row terms, e.g. ``cross_entropy``/``mse_loss``/``nll_loss`` with ``"mean"`` or ``"sum"``
  reduction, plus whatever follows the chain: a ``Softmax``, a scaling). The loss may not use the
  parameters otherwise (no weight decay term, no residual connection around the chain).

Not on the fast path: convolutions, normalisation layers, attention, shared or tied weights,
residual connections, parameters passed as non-leaf tensors, losses that couple samples.

Algorithm. With :math:`\ell = \sum_n \ell_n(o_n)` and per-sample Hessians
:math:`H^o_n = \nabla^2_{o_n} \ell` (found by autograd: C Hessian-vector products through the
loss part only, C the output width; separability checked with one more product on a random
vector), the per-sample Hessian w.r.t. each pre-activation follows from

.. math::
    H^{x}_n = W^\top H^{z}_n W, \qquad
    H^{z}_n = D_n H^{h}_n D_n + \operatorname{diag}\big(g^{h}_n \odot \sigma''(z_n)\big),

for :math:`z = W x + b`, :math:`h = \sigma(z)`, :math:`D_n = \operatorname{diag}\sigma'(z_n)`
and :math:`g^h_n` the gradient w.r.t. :math:`h_n`. Then
:math:`\operatorname{diag} H_{W_{ij}} = \sum_n [H^z_n]_{ii}\, x_{nj}^2` and
:math:`\operatorname{diag} H_{b_i} = \sum_n [H^z_n]_{ii}`. :math:`H^z_n` is kept as a signed
factor :math:`S_n \operatorname{diag}(s_n) S_n^\top + \operatorname{diag}(r_n)` (an
eigendecomposition of :math:`H^o_n`; each residual diagonal becomes :math:`d` more columns when
it passes a linear layer) while the factor is narrower than the layer, and as the full
:math:`d \times d` matrix otherwise; samples are processed in chunks that bound the memory.
Cost: one forward pass, C + 1 products through the loss, and per linear layer
:math:`O(N d_{in} d_{out} m)` with :math:`m \le d` the factor width (:math:`m = C` for
piecewise-linear activations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["exact_diagonal"]

# Element-wise activation modules: type -> True if piecewise linear (sigma'' = 0 almost
# everywhere, so no residual term). The derivatives come from autograd on the module's forward.
_ELEMENTWISE: dict[type[nn.Module], bool] = {
    nn.ReLU: True,
    nn.ReLU6: True,
    nn.LeakyReLU: True,
    nn.Hardtanh: True,
    nn.Hardsigmoid: True,
    nn.Dropout: True,  # only in eval mode (or p == 0): the identity
    nn.Identity: True,
    nn.Hardswish: False,
    nn.Sigmoid: False,
    nn.Tanh: False,
    nn.ELU: False,
    nn.SELU: False,
    nn.CELU: False,
    nn.GELU: False,
    nn.SiLU: False,
    nn.Mish: False,
    nn.Softplus: False,
    nn.LogSigmoid: False,
    nn.Softsign: False,
    nn.Tanhshrink: False,
}

# Modules whose weight (and bias) take the fast path.
_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear,)

# Elements of per-chunk curvature storage (rows x width x dim) before samples are chunked.
_CHUNK_ELEMENTS = 2**23


def _usable(module: nn.Module) -> bool:
    if type(module) is nn.Dropout:
        return not module.training or module.p == 0
    return True


@dataclass
class _Call:
    """One recorded call of a supported module."""

    module: nn.Module
    inp: torch.Tensor
    in_version: int
    pre: torch.Tensor | None  # the input's values, cloned before an in-place module ran
    out: torch.Tensor | None = None
    out_version: int = -1

    @property
    def is_layer(self) -> bool:
        return type(self.module) in _LAYERS


class _Recorder:
    """Global forward (pre-)hooks recording supported module calls of this thread only."""

    def __init__(self, param_ids: set[int]):
        self.param_ids = param_ids
        self.thread = threading.get_ident()
        self.calls: list[_Call] = []
        self.pending: dict[int, _Call] = {}
        self.foreign = False  # a listed parameter was used by a module off the fast path

    def __enter__(self) -> _Recorder:
        reg = nn.modules.module
        self.handles = [
            reg.register_module_forward_pre_hook(self._pre),
            reg.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if threading.get_ident() != self.thread:
            return
        kind = type(module)
        supported = kind in _LAYERS or (kind in _ELEMENTWISE and _usable(module))
        if not supported:
            if any(id(p) in self.param_ids for p in module._parameters.values()):
                self.foreign = True
            return
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or id(module) in self.pending:
            self.foreign = self.foreign or kind in _LAYERS
            return
        x = args[0]
        pre = x.detach().clone() if getattr(module, "inplace", False) else None
        self.pending[id(module)] = _Call(module, x, x._version, pre)

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        if threading.get_ident() != self.thread:
            return
        call = self.pending.pop(id(module), None)
        if call is None:
            return
        if not isinstance(output, torch.Tensor):
            self.foreign = self.foreign or call.is_layer
            return
        if output is call.inp and output._version == call.in_version:
            return  # returns its input untouched (Identity, Dropout in eval): invisible
        call.out, call.out_version = output, output._version
        self.calls.append(call)


def _reaches(roots: Iterable[object], stop: object, targets: set[int]) -> bool:
    """Whether the autograd graph from ``roots`` reaches a leaf in ``targets`` (by id) without
    passing through the node ``stop``."""
    seen: set[int] = set()
    todo = [r for r in roots if r is not None]
    while todo:
        node = todo.pop()
        if node is stop or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) in targets:
            return True
        todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)  # type: ignore[attr-defined]
    return False


def _chain(calls: list[_Call], params: list[torch.Tensor]) -> list[_Call] | None:
    """The chain from the first call owning a listed parameter to the output, or None."""
    ids = {id(p) for p in params}
    owners: dict[int, int] = {}
    for i, c in enumerate(calls):
        for p in c.module._parameters.values():
            if p is not None and id(p) in ids:
                if id(p) in owners:
                    return None  # shared weight, or a module called twice
                owners[id(p)] = i
    if len(owners) != len(ids):
        return None  # a listed parameter outside the supported modules (or unused)
    producers: dict[tuple[int, int], int] = {}
    for i, c in enumerate(calls):
        assert c.out is not None
        producers[(id(c.out), c.out_version)] = i
    consumers: dict[int, list[int]] = {}
    for j, c in enumerate(calls):
        i = producers.get((id(c.inp), c.in_version))
        if i is not None and i < j and calls[i].out is c.inp:
            consumers.setdefault(i, []).append(j)
    start = min(owners.values())
    chain = [start]
    while chain[-1] in consumers:
        nxt = consumers[chain[-1]]
        if len(nxt) != 1:
            return None  # a branch
        chain.append(nxt[0])
    if not set(owners.values()) <= set(chain):
        return None
    return [calls[i] for i in chain]


def _valid(chain: list[_Call], params: list[torch.Tensor], loss: torch.Tensor) -> bool:
    """The listed parameters reach the loss only through the chain, nothing was modified."""
    ids = {id(p) for p in params}
    for c in chain:
        if c.pre is None and c.inp._version != c.in_version:
            return False  # modified in place after the call
        for p in c.module._parameters.values():
            if p is not None and id(p) not in ids and p.requires_grad and not p.is_leaf:
                return False  # a computed weight (parametrization) may depend on params
    out = chain[-1].out
    assert out is not None
    if out._version != chain[-1].out_version:
        return False
    if _reaches([chain[0].inp.grad_fn], None, ids):
        return False  # the chain's input depends on params
    return not _reaches([loss.grad_fn], out.grad_fn, ids)


def _output_hessian(
    loss: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample Hessian (N, C, C) and gradient (N, C) of the loss w.r.t. the chain's output,
    or None when the loss is not separable over samples (rows) or does not use the output."""
    C = out.shape[-1]
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss.sum(), out, create_graph=True, allow_unused=True)
    if g is None:
        return None
    N = out.numel() // C
    if not g.requires_grad:  # loss linear in the output
        return out.new_zeros(N, C, C), g.detach().reshape(N, C)
    cols = []
    v = torch.zeros_like(out)
    flat = v.view(N, C)
    for c in range(C):
        flat.zero_()
        flat[:, c] = 1
        (hv,) = torch.autograd.grad(g, out, v, retain_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(out) if hv is None else hv)
    H = torch.stack([h.reshape(N, C) for h in cols], dim=2)  # H[n, :, c] = column c
    H = (H + H.mT) / 2
    # separability: one more product on a random vector must match the block-diagonal one
    gen = torch.Generator(device=out.device).manual_seed(0)
    probe = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    (hv,) = torch.autograd.grad(g, out, probe, allow_unused=True)
    hv = torch.zeros_like(out) if hv is None else hv
    block = torch.einsum("nij,nj->ni", H, probe.reshape(N, C))
    eps = torch.finfo(out.dtype).eps
    scale = torch.einsum("nij,nj->ni", H.abs(), probe.reshape(N, C).abs()).norm()
    if (hv.reshape(N, C) - block).norm() > 1e3 * eps * (scale + hv.norm()):
        return None
    return H, g.detach().reshape(N, C)


def _derivatives(call: _Call, need_second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sigma'(z) and sigma''(z) (None when zero) of an element-wise module, by autograd on its
    forward (not ``__call__``: the user's hooks do not fire again)."""
    z = (call.pre if call.pre is not None else call.inp).detach()
    piecewise = _ELEMENTWISE[type(call.module)]
    with torch.enable_grad():
        zl = z.clone().requires_grad_()
        h = call.module.forward(zl.clone())
        (d1,) = torch.autograd.grad(h.sum(), zl, create_graph=need_second and not piecewise)
        d2 = None
        if need_second and not piecewise and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), zl)
    return d1.detach(), d2


class _Curvature:
    """Per-sample Hessians of a chunk of samples w.r.t. one activation of width d:
    ``full`` (n, d, d), or ``S diag(sign) S^T + diag(r)`` with S (n, d, m), sign (n, m)."""

    def __init__(
        self,
        *,
        full: torch.Tensor | None = None,
        S: torch.Tensor | None = None,
        sign: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ):
        self.full, self.S, self.sign, self.r = full, S, sign, r

    @classmethod
    def factor(cls, H: torch.Tensor) -> _Curvature:
        """Signed factor of symmetric (n, C, C) blocks (eigendecomposition; diagonal: direct)."""
        d = H.diagonal(dim1=1, dim2=2)
        if torch.equal(H, torch.diag_embed(d)):
            return cls(S=torch.diag_embed(d.abs().sqrt()), sign=d.sign())
        lam, Q = torch.linalg.eigh(H)
        return cls(S=Q * lam.abs().sqrt().unsqueeze(1), sign=lam.sign())

    def diag(self) -> torch.Tensor:
        if self.full is not None:
            return self.full.diagonal(dim1=1, dim2=2)
        assert self.S is not None and self.sign is not None
        out = torch.einsum("nim,nm->ni", self.S * self.S, self.sign)
        return out if self.r is None else out + self.r

    def scale(self, d1: torch.Tensor, residual: torch.Tensor | None) -> _Curvature:
        """D H D + diag(residual), D = diag(d1)."""
        if self.full is not None:
            full = d1.unsqueeze(2) * self.full * d1.unsqueeze(1)
            if residual is not None:
                full.diagonal(dim1=1, dim2=2).add_(residual)
            return _Curvature(full=full)
        assert self.S is not None
        r = None if self.r is None else self.r * d1 * d1
        if residual is not None:
            r = residual if r is None else r + residual
        return _Curvature(S=self.S * d1.unsqueeze(2), sign=self.sign, r=r)

    def to_full(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        assert self.S is not None and self.sign is not None
        full = (self.S * self.sign.unsqueeze(1)) @ self.S.mT
        if self.r is not None:
            full.diagonal(dim1=1, dim2=2).add_(self.r)
        return full

    def width_after(self) -> int:
        """Factor width after a linear layer (the residual diagonal adds d columns)."""
        assert self.S is not None
        return self.S.shape[2] + (0 if self.r is None else self.S.shape[1])

    def linear(self, W: torch.Tensor) -> _Curvature:
        """W^T H W for z = W x (W of shape (d_out, d_in))."""
        d_in = W.shape[1]
        if self.full is None and self.width_after() < d_in:
            assert self.S is not None and self.sign is not None
            S, sign = W.T @ self.S, self.sign
            if self.r is not None:
                S = torch.cat([S, W.T * self.r.abs().sqrt().unsqueeze(1)], dim=2)
                sign = torch.cat([sign, self.r.sign()], dim=1)
            return _Curvature(S=S, sign=sign)
        return _Curvature(full=W.T @ self.to_full() @ W)


def _chunk_rows(chain: list[_Call], C: int, second: list[bool], n: int) -> int:
    """Samples per chunk so that the curvature storage stays under _CHUNK_ELEMENTS: replays the
    choices of :meth:`_Curvature.linear` (factor while narrower than the layer, else full)."""
    full, width, dim, residual = False, C, C, False
    peak = C * C
    for k in range(len(chain) - 1, 0, -1):
        c = chain[k]
        if not c.is_layer:
            residual = residual or second[k]
            continue
        d_in = c.module.weight.shape[1]  # type: ignore[union-attr]
        after = width + (dim if residual else 0)
        if not full and after < d_in:
            width = after
            peak = max(peak, d_in * width)
        else:
            full = True
            peak = max(peak, dim * dim, d_in * dim, d_in * d_in, dim * width)
        dim, residual = d_in, False
    return max(1, min(n, _CHUNK_ELEMENTS // peak))


def exact_diagonal(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """Exact Hessian diagonal by Hessian backpropagation, or ``None`` off the fast path.

    Runs ``loss_fn`` once (with global forward hooks that only record this thread's calls and
    are removed before returning). See the module docstring for the supported structures and
    the algorithm. ``.grad`` is not written.

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        params: the tensors (leaves) to take the Hessian diagonal with respect to.

    Returns:
        One tensor per parameter, shaped and typed like it, or ``None`` when the computation is
        not a supported chain (the caller then uses Hessian-vector products).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gradlab.curvature._backprop import exact_diagonal
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> loss_fn = lambda: nn.functional.mse_loss(net(x), y)
        >>> [d.shape for d in exact_diagonal(loss_fn, list(net.parameters()))]
        [torch.Size([4, 3]), torch.Size([4]), torch.Size([2, 4]), torch.Size([2])]
        >>> exact_diagonal(lambda: net(x).sum() ** 2, list(net.parameters())) is None
        True
    """
    params = list(params)
    if not params or any(not isinstance(p, torch.Tensor) or not p.is_leaf for p in params):
        return None
    ids = {id(p) for p in params}
    if len(ids) != len(params):
        return None
    with torch.enable_grad(), _Recorder(ids) as rec:
        loss = loss_fn()
    if rec.foreign or not rec.calls:
        return None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        return None
    chain = _chain(rec.calls, params)
    if chain is None or not _valid(chain, params, loss):
        return None
    out = chain[-1].out
    assert out is not None
    found = _output_hessian(loss, out)
    del loss
    if found is None:
        return None
    H_out, g_out = found
    N, C = g_out.shape

    # activations: sigma' and sigma'' (every one follows a parametrised layer: the chain
    # starts at one); second[k]: the residual term g * sigma'' is not zero
    second = [False] * len(chain)
    derivs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for k, c in enumerate(chain):
        if not c.is_layer:
            d1, d2 = _derivatives(c, need_second=True)
            second[k] = d2 is not None and bool(d2.any())
            derivs[k] = (d1.reshape(N, -1), d2.reshape(N, -1) if second[k] else None)  # type: ignore[union-attr]

    slot = {id(p): i for i, p in enumerate(params)}
    result: list[torch.Tensor | None] = [None] * len(params)
    acc: dict[int, torch.Tensor] = {}
    rows = _chunk_rows(chain, C, second, N)
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        curv = _Curvature.factor(H_out[lo:hi])
        g = g_out[lo:hi]
        for k in range(len(chain) - 1, -1, -1):
            c = chain[k]
            if not c.is_layer:
                d1, d2 = derivs[k]
                residual = None if d2 is None else g * d2[lo:hi]
                curv = curv.scale(d1[lo:hi], residual)
                g = g * d1[lo:hi]
                continue
            W = c.module.weight.detach()  # type: ignore[union-attr]
            x = c.inp.detach().reshape(N, -1)[lo:hi]
            dz = curv.diag()
            for name in ("weight", "bias"):
                p = c.module._parameters.get(name)
                if p is not None and id(p) in slot:
                    i = slot[id(p)]
                    value = dz.T @ (x * x) if name == "weight" else dz.sum(0)
                    acc[i] = value if i not in acc else acc[i] + value
            if k == 0:
                break
            curv = curv.linear(W)
            g = g @ W
    for i, p in enumerate(params):
        result[i] = acc[i].reshape(p.shape).to(p.dtype)
    return result  # type: ignore[return-value]
