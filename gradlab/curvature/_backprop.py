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
  row of the flattened leading dimensions is a *sample*) and of ``nn.Conv2d`` modules (any
  stride, dilation and integer padding; ``groups=1``, zero padding; a sample is an image);
* between them: element-wise activation modules (``ReLU``, ``ReLU6``, ``LeakyReLU``,
  ``Hardtanh``, ``Hardsigmoid``, ``Hardswish``, ``Sigmoid``, ``Tanh``, ``ELU``, ``SELU``,
  ``CELU``, ``GELU``, ``SiLU``, ``Mish``, ``Softplus``, ``LogSigmoid``, ``Softsign``,
  ``Tanhshrink``; in-place variants too), ``Dropout`` in eval mode, ``Flatten()`` (from dim 1),
  modules that return their input (``Identity``), the functions ``torch.relu``,
  ``torch.tanh``, ``torch.sigmoid``, ``F.silu``, ``F.gelu``, ``F.leaky_relu`` applied to a
  layer's output (recognised by their autograd node; not in place), and the pooling modules
  ``MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d``, ``AdaptiveMaxPool2d`` (any options but
  ``return_indices=True``; their second derivative is zero);
* the chain: each module's input is the previous module's output (the same tensor object,
  unmodified); the first parametrised module's input does not depend on ``params``; each listed
  parameter belongs to exactly one call of one chain module; the chain's modules may also hold
  parameters not in ``params`` (constants then);
* the loss: any function of the chain's output that is *separable over samples* (a sum of
  per-row terms, e.g. ``cross_entropy``/``mse_loss``/``nll_loss`` with ``"mean"`` or ``"sum"``
  reduction, plus whatever follows the chain: a ``Softmax``, a scaling). The loss may not use the
  parameters otherwise (no weight decay term, no residual connection around the chain).

Not on the fast path: other convolutions (1-d, 3-d, grouped, transposed), other pooling
(1-d, 3-d, functional calls such as ``F.max_pool2d``), normalisation layers, attention, shared
or tied weights, residual connections, parameters passed as non-leaf tensors, losses that couple
samples, and outputs so wide that the per-sample loss Hessians (N x C x C) would exceed
``_MAX_OUTPUT_HESSIAN`` elements (2^25).

Algorithm. With :math:`\ell = \sum_n \ell_n(o_n)` and per-sample Hessians
:math:`H^o_n = \nabla^2_{o_n} \ell` (in closed form for ``cross_entropy``, as a square root;
else by autograd: C Hessian-vector products through the loss part only, C the output width;
separability checked with one more product on a random vector), the per-sample Hessian w.r.t.
each pre-activation follows from

.. math::
    H^{x}_n = W^\top H^{z}_n W, \qquad
    H^{z}_n = D_n H^{h}_n D_n + \operatorname{diag}\big(g^{h}_n \odot \sigma''(z_n)\big),

for :math:`z = W x + b`, :math:`h = \sigma(z)`, :math:`D_n = \operatorname{diag}\sigma'(z_n)`
and :math:`g^h_n` the gradient w.r.t. :math:`h_n`. Then
:math:`\operatorname{diag} H_{W_{ij}} = \sum_n [H^z_n]_{ii}\, x_{nj}^2` and
:math:`\operatorname{diag} H_{b_i} = \sum_n [H^z_n]_{ii}`. :math:`H^z_n` is kept factored,
:math:`A_n H^o_n A_n^\top + B_n \operatorname{diag}(s_n) B_n^\top + \operatorname{diag}(r_n)`
with :math:`A_n = J_n^\top` the transposed Jacobian of the output (so the loss Hessian needs no
square root, and may be indefinite; for cross-entropy a square root is used instead, as in
BackPACK, with C - 1 columns, the Hessian's rank, where BackPACK has C) and signed
square-root columns for the residual diagonals (each becomes :math:`d` more columns when it
passes a layer), while the factor is narrower than the layer, and as the
full :math:`d \times d` matrix otherwise; samples are processed in chunks that bound the memory.
A convolution applies :math:`W^\top` to all the factor's columns as one ``conv_transpose2d``
and gets its weight diagonal from the unfolded input, as BackPACK does; a pooling layer
scatters them to the argmax (max) or applies its linear map by autograd (average). The gradient
:math:`g` is propagated only as far as a residual term needs it (not at all for
piecewise-linear activations).
Cost: one forward pass, C + 1 products through the loss (none for cross-entropy), and per
linear layer :math:`O(N d_{in} d_{out} m)` with :math:`m \le d` the factor width (:math:`m = C` for
piecewise-linear activations).
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from gradlab.curvature._backprop_layers import _OPS, _ConvOp, _Curvature, _LayerOp
from gradlab.curvature._backprop_loss import _cross_entropy_hessian, _output_hessian

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
    nn.Flatten: True,  # only from dim 1 on: a reshape of each sample's features
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

# Element-wise functions called between layers (``torch.relu(self.fc(x))``), found by their
# autograd node: node name -> (the function, rebuilt from the node's saved arguments; piecewise
# linear). The derivatives again come from autograd on the function.
_FUNCTIONAL: dict[str, tuple[Callable[[Any], Callable[[torch.Tensor], torch.Tensor]], bool]] = {
    "ReluBackward0": (lambda node: torch.relu, True),
    "LeakyReluBackward0": (
        lambda node: lambda z: nn.functional.leaky_relu(z, node._saved_negative_slope),
        True,
    ),
    "TanhBackward0": (lambda node: torch.tanh, False),
    "SigmoidBackward0": (lambda node: torch.sigmoid, False),
    "SiluBackward0": (lambda node: nn.functional.silu, False),
    "GeluBackward0": (
        lambda node: lambda z: nn.functional.gelu(z, approximate=node._saved_approximate),
        False,
    ),
}

# Largest per-sample loss Hessian (samples x C x C elements, C the output features per sample)
# the fast path computes (C + 1 batched products through the loss); beyond: None.
_MAX_OUTPUT_HESSIAN = 2**25

# Elements of per-chunk curvature storage (rows x width x dim) before samples are chunked.
_CHUNK_ELEMENTS = 2**23


def _usable(module: nn.Module) -> bool:
    if type(module) is nn.Dropout:
        return not module.training or module.p == 0
    if type(module) is nn.Flatten:
        return module.start_dim == 1 and module.end_dim == -1
    if type(module) in (nn.MaxPool2d, nn.AdaptiveMaxPool2d):
        return not module.return_indices
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and (not isinstance(module.padding, str) or module.padding == "valid")
        )
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
    # an element-wise function between layers (not a module call): itself, piecewise linear?
    function: tuple[Callable[[torch.Tensor], torch.Tensor], bool] | None = None

    @property
    def is_layer(self) -> bool:
        return type(self.module) in _OPS


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
        supported = (kind in _OPS or kind in _ELEMENTWISE) and _usable(module)
        if not supported:
            if any(id(p) in self.param_ids for p in module._parameters.values()):
                self.foreign = True
            return
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or id(module) in self.pending:
            self.foreign = self.foreign or kind in _OPS
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
    # Nodes, not their ids, here and in _chain: torch 2.8 and 2.11 (not 2.13) make a new Python
    # object for a node at each access once the last one is freed, so an id can come back for
    # another node (and the same node can come back with another id).
    seen: set[object] = set()
    todo = [r for r in roots if r is not None]
    while todo:
        node = todo.pop()
        if node is stop or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in targets:
            return True
        todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)  # type: ignore[attr-defined]
    return False


_FUNCTION = nn.Module()  # the module of a functional call (no parameters)


def _where(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return t.data_ptr(), tuple(t.shape), t.stride()


def _alias(x: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether ``x`` is ``out``, or ``out`` passed through the identity function that module
    full backward hooks wrap inputs and outputs in (``register_full_backward_hook``, BackPACK)."""
    if x is out:
        return True
    fn = x.grad_fn
    return (
        out is not None
        and fn is not None
        and type(fn).__name__ == "BackwardHookFunctionBackward"
        and any(nxt is out.grad_fn for nxt, _ in fn.next_functions)
        and _where(x) == _where(out)
    )


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
    producers: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, c in enumerate(calls):
        assert c.out is not None
        producers.setdefault(_where(c.out), []).append(i)
    consumers: dict[int, list[int]] = {}
    by_node = {c.out.grad_fn: i for i, c in enumerate(calls) if c.out is not None}
    for j, c in list(enumerate(calls)):
        linked = False
        for i in producers.get(_where(c.inp), ()):
            if i < j and c.in_version == calls[i].out_version and _alias(c.inp, calls[i].out):
                consumers.setdefault(i, []).append(j)
                linked = True
        node = c.inp.grad_fn
        name = type(node).__name__
        if linked or name not in _FUNCTIONAL or len(node.next_functions) != 1:  # type: ignore[union-attr]
            continue
        i = by_node.get(node.next_functions[0][0], -1)  # type: ignore[union-attr]
        z = calls[i].out if 0 <= i < j else None
        if z is None or z._version != calls[i].out_version:
            continue
        # an element-wise function of the layer's output: a call of its own in the chain
        make, piecewise = _FUNCTIONAL[name]
        calls.append(
            _Call(_FUNCTION, z, z._version, None, c.inp, c.in_version, (make(node), piecewise))
        )
        consumers.setdefault(i, []).append(len(calls) - 1)
        consumers[len(calls) - 1] = [j]
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


def _derivatives(call: _Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sigma'(z) and sigma''(z) (None when zero) of an element-wise module, by autograd on its
    forward (not ``__call__``: the user's hooks do not fire again)."""
    z = (call.pre if call.pre is not None else call.inp).detach()
    if call.function is not None:
        fn, piecewise = call.function
    else:
        fn, piecewise = call.module.forward, _ELEMENTWISE[type(call.module)]
    if fn is torch.relu or type(call.module) is nn.ReLU:  # the common case, without autograd
        return (z > 0).to(z.dtype), None  # relu's derivative at 0 is 0 in autograd too
    with torch.enable_grad():
        zl = z.clone().requires_grad_()
        h = fn(zl.clone())
        (d1,) = torch.autograd.grad(h.sum(), zl, create_graph=not piecewise)
        d2 = None
        if not piecewise and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), zl)
    return d1.detach(), d2


def _chunk_rows(
    chain: list[_Call], ops: dict[int, _LayerOp], C: int, second: list[bool], n: int
) -> int:
    """Samples per chunk so that the curvature storage stays under _CHUNK_ELEMENTS: replays the
    choices of :meth:`_Curvature.back` (factor while narrower than the layer, else full) and
    bounds the elements per sample that each step holds."""
    full, width, dim, residual = False, C, C, False  # width: the factor's columns (A and B)
    peak = C * C
    for k in range(len(chain) - 1, -1, -1):
        if k not in ops:
            residual = residual or second[k]
            continue
        op = ops[k]
        cols = dim if full else width  # a full matrix becomes dim columns (factored())
        peak = max(peak, cols * dim)
        if isinstance(op, _ConvOp):  # the unfolded input, the per-column weight gradients
            J, C_out = op.W[0].numel(), op.out_shape[0]
            peak = max(peak, J * (op.d_out // C_out) + 2 * C_out * J * cols)
        if k == 0:
            break
        after = width + (dim if residual else 0)
        if not full and after < op.d_in:
            width = after
            peak = max(peak, op.d_in * width, dim * dim if residual else 0)
        else:
            full = True
            peak = max(peak, dim * dim, op.d_in * dim, op.d_in * op.d_in)
        dim, residual = op.d_in, False
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
    ops = {
        k: _OPS[type(c.module)](c.module, c.inp, cast(torch.Tensor, c.out))
        for k, c in enumerate(chain)
        if c.is_layer
    }
    N = ops[0].rows
    out = chain[-1].out
    assert out is not None
    if any(op.rows != N for op in ops.values()) or out.numel() % N:
        return None  # layers disagree on what a sample is
    if out.numel() * (out.numel() // N + 1) > _MAX_OUTPUT_HESSIAN:
        return None
    found = _cross_entropy_hessian(loss, out, N)
    root = found is not None
    found = found or _output_hessian(loss, out, N)
    del loss
    if found is None:
        return None
    H_out, g_out = found
    C = g_out.shape[1]

    # activations: sigma' and sigma'' (every one follows a layer: the chain starts at one);
    # second[k]: the residual term g * sigma'' is not zero
    second = [False] * len(chain)
    derivs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for k, c in enumerate(chain):
        if k not in ops:
            d1, d2 = _derivatives(c)
            second[k] = d2 is not None and bool(d2.any())
            derivs[k] = (d1.reshape(N, -1), d2.reshape(N, -1) if second[k] else None)  # type: ignore[union-attr]
    # the gradient is needed at position k only for residual terms further down the chain
    # (none at all for piecewise-linear activations)
    need_g = list(itertools.accumulate(second[:-1], operator.or_, initial=False))

    slot = {id(p): i for i, p in enumerate(params)}
    acc: dict[int, torch.Tensor] = {}
    rows = _chunk_rows(chain, ops, C, second, N)
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        curv = _Curvature.output(H_out[lo:hi], root)
        g = g_out[lo:hi]
        for k in range(len(chain) - 1, -1, -1):
            if k not in ops:
                d1, d2 = derivs[k]
                residual = None if d2 is None else g * d2[lo:hi]
                curv = curv.scale(d1[lo:hi], residual)
                if need_g[k]:
                    g = g * d1[lo:hi]
                continue
            op = ops[k]
            wanted = {
                name: slot[id(p)]
                for name, p in chain[k].module._parameters.items()
                if p is not None and id(p) in slot
            }
            if wanted:
                diagonals = op.diagonals(curv, lo, hi)
                for name, i in wanted.items():
                    acc[i] = diagonals[name] if i not in acc else acc[i] + diagonals[name]
            if k == 0:
                break
            curv = curv.back(op, lo, hi)
            if need_g[k]:
                g = op.grad_back(g, lo, hi)
    return [acc[i].reshape(p.shape).to(p.dtype) for i, p in enumerate(params)]
