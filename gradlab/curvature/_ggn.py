r"""The generalized Gauss-Newton and the Fisher as linear operators: :math:`J^\top M J`.

For a model :math:`f(\theta, x)` and a loss :math:`L = c\sum_n \ell(f_n, y_n)`, every one of these
matrices is :math:`\sum_n J_n^\top M_n J_n` with :math:`J_n = \partial f_n/\partial\theta`:

- GGN: :math:`M_n = c\,\nabla^2_f \ell(f_n, y_n)`, the loss Hessian w.r.t. the output;
- empirical Fisher: :math:`M_n = c\, g_n g_n^\top`, :math:`g_n = \nabla_f \ell(f_n, y_n)`;
- Monte-Carlo Fisher: :math:`M_n = \frac{c}{S}\sum_s g_{ns} g_{ns}^\top` with
  :math:`g_{ns} = \nabla_f \ell(f_n, \hat y_{ns})`, :math:`\hat y_{ns} \sim p(y \mid f_n)`
  (drawn once per operator, so it is a fixed matrix; unbiased for the GGN).

A product is :math:`Jv`, the output matrix, and a ``vjp`` (:math:`J^\top u`, one backward)
through the graph of the batch's forward pass: the model's second derivatives are never formed.
:math:`Jv` comes from forward mode (dual tensors for one vector, a vmapped ``jvp`` for a chunk of
k vectors), which re-runs the forward pass with tangents; or, for one vector on a kept batch of
a model without convolutions, from one backward through the graph of :math:`u \mapsto J^\top u`
(the "double-vjp" trick: that map is linear, so its vjp is :math:`Jv`), which re-runs no forward
pass; a convolution's double backward costs more than its forward, so models with one keep
forward mode. Cost per product: about two backward passes (or a forward with tangents and a
backward), against a forward and a backward for one gradient.

Memory policy: a single batch (``batch=``, or ``data=`` with one batch) keeps its forward graph
(and, once used, the graph of :math:`J^\top u`) for the operator's lifetime, so its products
re-run nothing else; with several batches only one batch's graph is alive at a time and each
pass over ``data=`` re-runs every batch's forward pass (memory of one batch, not of the data):
for one vector that forward runs on dual tensors whose primals build the graph, so
:math:`Jv` and the graph of the ``vjp`` come from one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from gradlab.curvature import _distributed as dist_
from gradlab.curvature._args import (
    BatchWeight,
    GeneratorArg,
    check_batch_weight,
    check_choice,
    check_data,
    check_distributed,
    check_generator,
    check_mode,
    check_params,
    check_positive,
)
from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._distributed import shared_seed
from gradlab.curvature._layers import (
    capture,
    input_rows,
    layer_problem,
    output_grads,
    output_rows,
)
from gradlab.curvature._losses import LossRule, check_targets, loss_rule
from gradlab.curvature._state import model_state

__all__ = ["GGNOperator", "fisher_operator", "ggn_diagonal", "ggn_operator"]

LossHessian = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_dot(R: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``<R[s, n], U[k, n]>`` summed over the output dims: shape ``(k, S, N)``."""
    k, S, N = U.shape[0], R.shape[0], R.shape[1]
    return torch.einsum("sni,kni->ksn", R.reshape(S, N, -1), U.reshape(k, N, -1))


_STACK_LIMIT = 1 << 19  # gradient entries a convolution model's batched backward may stack


class GGNOperator(CurvatureOperator):
    """:math:`\\sum_n J_n^\\top M_n J_n` of a model and a loss (GGN, empirical or MC Fisher).

    Made by :func:`gradlab.ggn_operator` and :func:`gradlab.fisher_operator`. Vectors are flat
    over the model's trainable parameters in ``named_parameters()`` order, or per-parameter
    pieces.

    Attributes:
        shape: ``(n, n)``, as every :class:`~gradlab.curvature.CurvatureOperator`.
        dtype: the parameters' dtype.
        device: the parameters' device.
        params: the parameter tensors.
        names: their names.

    Example:
        The GGN of a small network against :math:`J^\\top M J` written out (``MSELoss``, mean
        over 8 samples of one output: :math:`M = 2/8`):

        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> G = gl.ggn_operator(model, nn.MSELoss(), (X, y))
        >>> G.shape, G.names
        ((21, 21), ['0.weight', '0.bias', '2.weight', '2.bias'])
        >>> fm = gl.functional(model)
        >>> J = gl.jacobian(lambda p: fm(p, X), fm.params)  # {name: (8, 1, *p.shape)}
        >>> J = torch.cat([block.reshape(8, -1) for block in J.values()], dim=1)
        >>> torch.allclose(G.matmat(torch.eye(21)), 2 / 8 * J.T @ J, atol=1e-5)
        True
    """

    def __init__(
        self,
        fn: str,
        model: nn.Module,
        loss_fn: Any,
        batch: Any,
        *,
        kind: str = "ggn",
        data: Iterable[Any] | None = None,
        batch_weight: BatchWeight = None,
        distributed: bool = False,
        mode: str | None = "eval",
        mc_samples: int = 1,
        generator: GeneratorArg = None,
        loss_hessian: LossHessian | None = None,
    ) -> None:
        check_mode(fn, mode)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{fn}: model must be an nn.Module, got {type(model).__name__}. Pass the model "
                f"and the loss separately: {fn}(model, loss_fn, (X, y))"
            )
        if not callable(loss_fn):
            raise TypeError(
                f"{fn}: loss_fn must be a loss callable loss_fn(output, y), e.g. "
                f"nn.CrossEntropyLoss(), got {type(loss_fn).__name__}"
            )
        if (batch is None) == (data is None):
            raise ValueError(
                f"{fn}: pass exactly one of the batch (X, y) and data= (an iterable of (X, y) "
                f"batches), got {'both' if batch is not None else 'neither'}"
            )
        data = check_data(fn, data)
        check_batch_weight(fn, batch_weight)
        check_distributed(fn, distributed)
        if batch_weight is not None and data is None:
            raise ValueError(f"{fn}: batch_weight= is only used with data=; pass data= too")
        if loss_hessian is not None:
            if not callable(loss_hessian):
                raise TypeError(
                    f"{fn}: loss_hessian must be a callable loss_hessian(output, y, U), got "
                    f"{type(loss_hessian).__name__}"
                )
            if kind != "ggn":
                raise ValueError(
                    f"{fn}: loss_hessian= is used by the GGN only; the {kind} Fisher needs a "
                    f"registered loss"
                )
            self._rule: LossRule | None = None
            self._c_mean = False
        else:
            self._rule, reduction = loss_rule(fn, loss_fn)
            self._c_mean = reduction == "mean"
        tensors, names = check_params(fn, model)
        self.params = tensors
        self.names = list(names)
        super().__init__(
            fn,
            [p.shape for p in tensors],
            tensors[0].dtype,
            tensors[0].device,
            data=data,
            batch_weight=batch_weight,
            distributed=distributed,
        )
        self._model = model
        index = {id(p): i for i, p in enumerate(tensors)}
        self._slots: list[list[tuple[nn.Module, str]]] = [[] for _ in tensors]
        for m in model.modules():  # every place a trainable parameter sits (tied: several)
            for attr, p in m._parameters.items():
                if p is not None and id(p) in index:
                    self._slots[index[id(p)]].append((m, attr))
        self._loss_fn = loss_fn
        self._conv_free = not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        self._batch = batch
        self._kind = kind
        self._mode = mode
        self._mc = mc_samples
        self._loss_hessian = loss_hessian
        if distributed:
            if data is None:
                raise ValueError(
                    f"{fn}: distributed=True needs data= (each rank's own shard of batches)"
                )
            dist_.check_group(fn)
            dist_.check_same_shapes(fn, self.names, self.params)
        self._seed = 0
        if kind == "mc":  # an int is the seed itself (as curvlinops' seed=); else one draw
            gen = check_generator(fn, generator)
            is_int = isinstance(generator, int) and not isinstance(generator, bool)
            self._seed = int(generator) if is_int else shared_seed(gen, distributed)  # type: ignore[arg-type]
        if batch is not None:
            self._unpack(batch, None)

    # ----------------------------------------------------------------------------------------

    def _unpack(self, batch: Any, index: int | None) -> tuple[Any, torch.Tensor]:
        where = "the batch" if index is None else f"batch {index} of data"
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = (
                f"a {type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list))
                else f"a {type(batch).__name__}"
            )
            raise TypeError(
                f"{self._fn}: {where} must be a pair (X, y) of inputs and targets, got {got}. "
                f"The model is called as model(X) and the loss as loss_fn(model(X), y)"
            )
        X, y = batch
        if isinstance(X, torch.Tensor) and X.dim() > 0 and X.shape[0] == 0:
            raise ValueError(
                f"{self._fn}: {where} is empty (X has shape {tuple(X.shape)}); pass a non-empty "
                f"batch"
            )
        return X, y

    def _forward(self, X: Any) -> Callable[..., torch.Tensor]:
        """``f(*params) = model(X)`` with the trainable parameters replaced by ``params``.

        As ``torch.func.functional_call``, with the parameters' places looked up once (each
        call swaps them in and back: the module is changed while ``f`` runs).
        """
        model, slots = self._model, self._slots

        def f(*params: torch.Tensor) -> torch.Tensor:
            saved = []
            try:
                for places, p in zip(slots, params):
                    for m, attr in places:
                        saved.append((m, attr, m._parameters[attr]))
                        m._parameters[attr] = p  # type: ignore[assignment]
                return model(X)  # type: ignore[no-any-return]
            finally:
                for m, attr, old in reversed(saved):
                    m._parameters[attr] = old

        return f

    def _mode_ctx(self) -> contextlib.AbstractContextManager[None]:
        return model_state(self._model, self._mode)

    def _prepare(self, batch: Any, index: int | None) -> _Batch | _Pending:
        """A single batch: its forward graph, kept. One of several: only the batch, whose
        forward pass runs with each product (one vector: fused with the tangents)."""
        X, y = self._unpack(self._batch if index is None else batch, index)
        if self._batches == 1:
            return self._build(X, y, index, kept=True)
        return _Pending(X, y, index)

    def _build(self, X: Any, y: Any, index: int | None, *, kept: bool) -> _Batch:
        """One forward pass with its graph, and the output matrix at its output."""
        leaves = tuple(p.detach().requires_grad_() for p in self.params)
        with self._mode_ctx(), torch.enable_grad():
            out = self._forward(X)(*leaves)
        self._check_output(out)
        M = self._output_matrix(out.detach(), y, index)
        # a kept batch without convolutions: Jv by double backward (see _jvp_one)
        double = kept and self._conv_free and _builtin_graph(out)
        transposed: list[Any] | None = [] if double else None
        return _Batch(X, tuple(p.detach() for p in self.params), leaves, out, M, transposed)

    def _check_output(self, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            raise ValueError(
                f"{self._fn}: the model must return a batched output tensor (N, ...), got "
                f"{type(out).__name__ if not isinstance(out, torch.Tensor) else 'a 0-dim tensor'}"
            )

    def _output_matrix(
        self, out: torch.Tensor, y: Any, index: int | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """:math:`U \\mapsto M U` for ``U`` of shape ``(k, *out.shape)``."""
        if self._rule is None:
            loss_hessian = self._loss_hessian
            assert loss_hessian is not None
            return lambda U: loss_hessian(out, y, U)
        rule = self._rule
        check_targets(self._fn, rule, self._loss_fn, out, y)
        c = 1.0 / rule.terms(out) if self._c_mean else 1.0
        if self._kind == "ggn":
            H = rule.hessian(out, y)
            return H if c == 1.0 else lambda U: H(U).mul_(c)
        if self._kind == "empirical":
            R = rule.grad(out, y).unsqueeze(0)
        else:
            R = self._mc_grads(out, index)
            c = c / self._mc
        R = R.reshape(R.shape[0], R.shape[1], -1)  # (S, N, outputs per sample)
        return lambda U: (
            torch.einsum("ksn,sni->kni", per_sample_dot(R, U), R).mul_(c).reshape(U.shape)
        )

    def _factors(self, out: torch.Tensor, y: Any, index: int | None) -> torch.Tensor:
        r""":math:`\Phi` of shape ``(m, *out.shape)`` with :math:`M_n = \sum_j \phi_{jn}
        \phi_{jn}^\top` (the loss Hessian's square root, or the sampled gradients)."""
        rule = self._rule
        assert rule is not None
        check_targets(self._fn, rule, self._loss_fn, out, y)
        c = 1.0 / rule.terms(out) if self._c_mean else 1.0
        if self._kind == "ggn":
            return rule.sqrt(out, y) * c**0.5
        if self._kind == "empirical":
            return rule.grad(out, y).unsqueeze(0) * c**0.5
        return self._mc_grads(out, index) * (c / self._mc) ** 0.5

    def _mc_grads(self, out: torch.Tensor, index: int | None) -> torch.Tensor:
        """The ``mc_samples`` sampled output gradients of one batch (fixed by the seed)."""
        rule = self._rule
        assert rule is not None
        rank = 0
        if self._distributed:
            import torch.distributed as dist

            rank = dist.get_rank()
        gen = torch.Generator(device=out.device)
        gen.manual_seed(self._seed + (index or 0) + 1_000_003 * rank)
        return torch.stack([rule.grad(out, rule.sample(out, gen)) for _ in range(self._mc)])

    def _exact_diagonal(self) -> torch.Tensor:
        r""":math:`\sum_n \sum_j (J_n^\top \phi_{jn})^2` by per-sample vector-Jacobian products.

        BackPACK's DiagGGN: the square root of each sample's output matrix pulled back through
        that sample's Jacobian, no product of the full matrix. With every parameter in a
        Linear/Conv2d layer called once, the columns are backpropagated to the layer outputs
        and the per-sample weight gradients formed there (:meth:`_layer_diagonal`); otherwise
        per-sample ``vjp`` are vmapped over samples. A custom ``loss_hessian=`` has no square
        root: then n products.
        """
        if self._rule is None:
            return super()._exact_diagonal()
        layout = self._layer_layout()
        if layout is not None:
            out = self._layer_diagonal(layout)
            if out is not None:
                return out
        return self._vmap_diagonal()

    def _vmap_diagonal(self) -> torch.Tensor:
        """Per-sample vector-Jacobian products of the factor columns, vmapped over samples."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        primals = tuple(p.detach() for p in self.params)
        model, names = self._model, self.names
        for batch, index, w in self._iter_data():
            X, y = self._unpack(self._batch if index is None else batch, index)
            with self._mode_ctx(), torch.no_grad():
                f = torch.func.functional_call(model, dict(zip(names, primals)), (X,))
            Phi = self._factors(f, y, index).movedim(0, 1)  # (N, m, *out_n)

            def per_sample(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, ...]:
                def f_n(*params: torch.Tensor) -> torch.Tensor:
                    args = (x.unsqueeze(0),)
                    return torch.func.functional_call(
                        model, dict(zip(names, params)), args
                    ).squeeze(0)

                _, vjp_fn = torch.func.vjp(f_n, *primals)  # type: ignore[misc]
                return tuple((g**2).sum(0) for g in torch.func.vmap(vjp_fn)(phi))

            N, m = Phi.shape[0], Phi.shape[1]
            step = max(1, (1 << 22) // max(1, m * self.n))  # bound N * m * n in memory
            with self._mode_ctx():
                for lo in range(0, N, step):
                    squares = torch.func.vmap(per_sample)(X[lo : lo + step], Phi[lo : lo + step])
                    for i, sq in enumerate(squares):
                        a, b = self.offsets[i], self.offsets[i + 1]
                        out[a:b].add_(sq.sum(0).reshape(-1), alpha=w)
            self._skip(self.n)  # closed form: none of the n products ran
        self._finish([out])
        return out

    def _layer_layout(self) -> list[tuple[str, nn.Module, str]] | None:
        """Each parameter's layer (name, module, ``"weight"``/``"bias"``), or None if a
        parameter is not in a layer with a closed-form rule (Linear, Conv2d)."""
        owner = {
            id(p): (name, m)
            for name, m in self._model.named_modules()
            for p in m.parameters(recurse=False)
        }
        layout = []
        for p in self.params:
            name, m = owner.get(id(p), ("", None))
            if m is None or layer_problem(m) is not None:
                return None
            layout.append((name, m, "weight" if p is m.weight else "bias"))
        return layout

    def _layer_pass(
        self,
        layers: dict[str, nn.Module],
        batch: Any,
        index: int | None,
        *,
        flat_output: bool = False,
        once: bool = False,
    ) -> tuple[dict[str, list[tuple[Any, Any]]], dict[str, list[list[torch.Tensor]]]] | None:
        """One forward pass recording ``layers``, and the output-matrix factor columns
        backpropagated to each call's output: ``(seen, grads)``, per layer name a list over its
        calls of ``(input, output)`` and of chunks ``(k, *output.shape)`` of the m columns (see
        :func:`~gradlab.curvature._layers.output_grads`). None, before any backward, if
        ``once`` and a layer was called more than once or never."""
        X, y = self._unpack(self._batch if index is None else batch, index)
        with self._mode_ctx(), torch.enable_grad(), capture(layers) as seen:
            out = self._model(X)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or (flat_output and out.dim() != 2):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self._fn}: the model output must have shape "
                f"{'(N, C)' if flat_output else '(N, ...)'}, got {got}. Flatten it or use "
                f"gl.ggn_operator"
            )
        if once and any(len(seen[name]) != 1 for name in layers):
            return None
        Phi = self._factors(out.detach(), y, index)  # (m, *out.shape)
        keys = [(name, i) for name in layers for i in range(len(seen[name]))]
        outputs = [seen[name][i][1] for name, i in keys]
        # one vmapped backward, except for convolutions with large outputs: their batching
        # rule loops over the columns and then stacks them, a copy that costs more than
        # looping here (measured on CPU: 1.4x faster from ~1M gradient entries, 0.7x below)
        size = Phi.shape[0] * sum(o.numel() for o in outputs)
        gs = output_grads(out, outputs, Phi, batched=self._conv_free or size <= _STACK_LIMIT)
        grads: dict[str, list[list[torch.Tensor]]] = {name: [] for name in layers}
        for (name, _), g in zip(keys, gs):
            grads[name].append(g)
        return seen, grads

    def _layer_diagonal(self, layout: list[tuple[str, nn.Module, str]]) -> torch.Tensor | None:
        r"""The exact diagonal for parameters that all sit in Linear/Conv2d layers (each called
        once; None otherwise, for the vmapped path).

        BackPACK's rule: one backward of the factor columns to the layer outputs :math:`g`; the
        weight's per-sample gradient is :math:`\sum_r g_{nr} a_{nr}^\top` (r over positions:
        conv patches, sequence steps), so its square needs no per-sample Jacobian.
        """
        layers = {name: m for name, m, _ in layout}
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for batch, index, w in self._iter_data():
            passed = self._layer_pass(layers, batch, index, once=True)
            if passed is None:  # a layer called twice or never
                return None
            seen, grads = passed
            sq: dict[tuple[str, str], torch.Tensor] = {}
            for name, m in layers.items():
                a = input_rows(m, seen[name][0][0])  # (N, R, d_in)
                chunks = [output_rows(m, c) for c in grads[name][0]]  # (k, N, R, d_out) each
                sq[(name, "weight")], sq[(name, "bias")] = _squares(chunks, a)
            for i, (name, _, kind) in enumerate(layout):
                out[self.offsets[i] : self.offsets[i + 1]].add_(
                    sq[(name, kind)].reshape(-1), alpha=w
                )
            self._skip(self.n)  # closed form: none of the n products ran
        self._finish([out])
        return out

    def _batch_products(self, state: _Batch | _Pending, V: Pieces) -> Pieces:
        """:math:`J^\\top M J V`: :math:`JV`, the output matrix, one backward.

        The backward runs through the graph of the batch's forward pass. :math:`JV` comes from
        :meth:`_jvp_one` for one vector, from a vmapped forward-mode ``jvp`` for several. A
        batch of several (not kept) with one vector: one forward pass on dual tensors that also
        builds the graph (:meth:`_fused_product`), so the forward runs once per product.
        """
        k = V[0].shape[0]
        if getattr(fwAD, "_current_level", -1) >= 0:
            raise RuntimeError(
                f"{self._fn}: products cannot run inside torch.autograd.forward_ad.dual_level() "
                f"(they use forward mode, and PyTorch does not nest its levels); apply the "
                f"operator outside the dual_level block"
            )
        if isinstance(state, _Pending):
            if k == 1 and state.built is None:
                return self._fused_product(state, [v[0] for v in V])
            if state.built is None:  # several vectors: the graph, kept for this pass
                state.built = self._build(state.X, state.y, state.index, kept=False)
            state = state.built
        if k == 1:
            JV = self._jvp_one(state, [v[0] for v in V]).unsqueeze(0)
        else:

            def jvp(*tangents: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(self._forward(state.X), state.primals, tangents)[1]

            with self._mode_ctx():
                JV = torch.func.vmap(jvp)(*V)
        U = state.M(JV)
        if k == 1:
            return [g.unsqueeze(0) for g in self._vjp(state, U[0], batched=False)]
        try:
            return self._vjp(state, U, batched=True)
        except RuntimeError:  # an op without a batching rule: one backward per vector
            cols = [self._vjp(state, U[i], batched=False) for i in range(k)]
            return [torch.stack(c) for c in zip(*cols)]

    def _fused_product(self, state: _Pending, vs: Pieces) -> Pieces:
        """:math:`J^\\top M J v` for one vector from one forward pass on dual tensors whose
        primals require grad: the output's tangent is :math:`Jv` and its primal has the graph."""
        leaves = tuple(p.detach().requires_grad_() for p in self.params)
        with self._mode_ctx(), torch.enable_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, v) for p, v in zip(leaves, vs)]
            out, tangent = fwAD.unpack_dual(self._forward(state.X)(*duals))
        self._check_output(out)
        jv = torch.zeros_like(out) if tangent is None else tangent.detach()
        U = self._output_matrix(out.detach(), state.y, state.index)(jv.unsqueeze(0))
        grads = torch.autograd.grad(out, leaves, U[0], allow_unused=True, materialize_grads=True)
        return [g.unsqueeze(0) for g in grads]

    def _jvp_one(self, state: _Batch, vs: Pieces) -> torch.Tensor:
        """:math:`Jv` for one vector.

        For a kept batch of a model without convolutions: one backward through the graph of
        :math:`u \\mapsto J^\\top u` (built once, by a backward with ``create_graph`` at a dummy
        :math:`u`; linear in :math:`u`, so its derivative is :math:`J`), which re-runs no forward
        pass. Otherwise (convolutions, whose double backward is slower than a forward; a batch
        that is not kept; an operation without a double backward): a forward pass on dual
        tensors (forward mode), no graph built.
        """
        if state.transposed is not None:
            if not state.transposed:
                state.transposed.append(self._transpose_graph(state))
            graph = state.transposed[0]
            if graph is not None:
                u, live, gs = graph
                if not live:
                    return torch.zeros_like(state.out)
                try:
                    (jv,) = torch.autograd.grad(gs, u, [vs[i] for i in live], retain_graph=True)
                    return jv
                except RuntimeError:  # no double backward (@once_differentiable): forward mode
                    state.transposed[0] = None
        with self._mode_ctx(), torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, v) for p, v in zip(state.primals, vs)]
            out = self._forward(state.X)(*duals)
            tangent = fwAD.unpack_dual(out).tangent
        return torch.zeros_like(out) if tangent is None else tangent

    def _transpose_graph(self, state: _Batch) -> Any:
        """``(u, live, J^T u)``: the graph of the vector-Jacobian product at a dummy ``u``,
        ``live`` the parameters it reaches; None if it cannot be built."""
        u = torch.zeros_like(state.out, requires_grad=True)
        try:
            with torch.enable_grad():
                g = torch.autograd.grad(
                    state.out,
                    state.leaves,
                    u,
                    retain_graph=True,
                    create_graph=True,
                    allow_unused=True,
                )
        except RuntimeError:
            return None
        live = [i for i, t in enumerate(g) if t is not None and t.requires_grad]
        return u, live, [g[i] for i in live]

    def _vjp(self, state: _Batch, U: torch.Tensor, *, batched: bool) -> Pieces:
        """:math:`J^\\top u` through the kept graph (``U`` a stack of k vectors if batched)."""
        return list(
            torch.autograd.grad(
                state.out,
                state.leaves,
                U,
                retain_graph=True,
                is_grads_batched=batched,
                allow_unused=True,
                materialize_grads=True,
            )
        )


class _Batch(NamedTuple):
    """A batch's state for products: its forward graph kept, its output matrix."""

    X: Any
    primals: tuple[torch.Tensor, ...]  # the parameters, detached
    leaves: tuple[torch.Tensor, ...]  # detached copies requiring grad: the graph's leaves
    out: torch.Tensor  # the model output, with its graph
    M: Callable[[torch.Tensor], torch.Tensor]  # U -> M U on (k, *out.shape)
    # the graph of u -> J^T u, built on first use ([] until then); None: forward mode instead
    transposed: list[Any] | None


class _Pending:
    """A batch of several, not kept: its forward pass runs with its products."""

    __slots__ = ("X", "built", "index", "y")

    def __init__(self, X: Any, y: Any, index: int | None) -> None:
        self.X, self.y, self.index = X, y, index
        self.built: _Batch | None = None  # the graph, once several vectors needed it


# Elements of the per-sample weight gradients (columns x N x d_out x d_in) held at once
_SQUARES_ELEMENTS = 1 << 20
# Elements of a layer's output gradients (columns x N x d_out x R) stacked for one product
_STACKED_ELEMENTS = 1 << 20


def _squares(chunks: list[torch.Tensor], a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The squared per-sample weight and bias gradients, summed over columns and samples:
    :math:`\sum_{k,n} (\sum_r g_{knr} a_{nr}^\top)^{\circ 2}` of shape ``(d_out, d_in)`` and
    :math:`\sum_{k,n} (\sum_r g_{knr})^{\circ 2}`, for the columns ``g`` given as chunks
    ``(k, N, R, d_out)`` and the inputs ``a`` of shape ``(N, R, d_in)``.

    Without weight sharing (R = 1) the squares are summed over the columns first (one product
    in all). Else, while the gradients are small (``_STACKED_ELEMENTS``), they are copied into
    one ``(N, m d_out, R)`` stack and all columns' per-sample gradients are one batched product
    (larger matrices, fewer calls); above, each column's are one batched product over the samples
    (on the tensors' own strides: a conv's patches and output gradients are transposed views,
    which the product reads without a copy), written into a buffer of up to
    ``_SQUARES_ELEMENTS`` that is squared and summed once.
    """
    N, R, d_in = a.shape
    if R == 1:  # no weight sharing: sum the squares over columns first
        g2: torch.Tensor | None = None
        for c in chunks:
            c = c[:, :, 0]  # (k, N, d_out)
            if c.shape[0] > 1:
                s = c.square().sum(0)
                g2 = s if g2 is None else g2.add_(s)
            else:
                g2 = c[0].square() if g2 is None else g2.addcmul_(c[0], c[0])
        assert g2 is not None
        return g2.T @ a[:, 0].square(), g2.sum(0)
    d_out = chunks[0].shape[-1]
    m = sum(c.shape[0] for c in chunks)
    if m * N * d_out * R <= _STACKED_ELEMENTS:  # small: one copy, one product for all columns
        S = torch.cat([c.transpose(2, 3).transpose(0, 1) for c in chunks], 1)  # (N, m, d_out, R)
        G = torch.bmm(S.view(N, m * d_out, R), a)
        return G.square_().view(N * m, d_out, d_in).sum(0), S.sum(3).square_().sum((0, 1))
    group = max(1, min(m, _SQUARES_ELEMENTS // (N * d_out * d_in)))
    G = a.new_empty(group, N, d_out, d_in)  # per column and sample, the weight gradient
    B = a.new_empty(group, N, d_out)  # and the bias gradient
    weight, bias = a.new_zeros(d_out, d_in), a.new_zeros(d_out)

    def flush(i: int) -> None:
        weight.add_(G[:i].square_().sum((0, 1)))
        bias.add_(B[:i].square_().sum((0, 1)))

    Gs, Bs = G.unbind(), B.unbind()
    i = 0
    for c in chunks:
        for g in c.transpose(2, 3).unbind():  # (N, d_out, R) per column
            torch.bmm(g, a, out=Gs[i])
            torch.sum(g, 2, out=Bs[i])
            i += 1
            if i == group:
                flush(i)
                i = 0
    if i:
        flush(i)
    return weight, bias


def _builtin_graph(out: torch.Tensor) -> bool:
    """Whether every node of ``out``'s graph is a built-in one (no ``autograd.Function``).

    A built-in backward is differentiable or raises when differentiated; a custom Function's
    backward may cut or hide its graph (``@once_differentiable``, ``.detach()``, NumPy) and
    make a double backward silently wrong, so the double-vjp trick is used only without one.
    """
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return False
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return True


def check_sampling(fn: str, arg: str, value: str, mc_samples: Any, generator: Any) -> None:
    """``mc_samples`` >= 1, and ``mc_samples=``/``generator=`` only with ``{arg}="mc"``."""
    check_positive(fn, "mc_samples", mc_samples)
    if value != "mc" and (mc_samples != 1 or generator is not None):
        raise ValueError(
            f"{fn}: mc_samples= and generator= are used by {arg}='mc' only, got "
            f"{arg}={value!r}; drop them or pass {arg}='mc'"
        )


def _operator(
    fn: str, model: Any, loss_fn: Any, batch: Any, kind: str, **kwargs: Any
) -> GGNOperator:
    return GGNOperator(fn, model, loss_fn, batch, kind=kind, **kwargs)


def ggn_operator(
    model: nn.Module,
    loss_fn: Any,
    batch: tuple[Any, torch.Tensor] | None = None,
    *,
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    mode: str | None = "eval",
    loss_hessian: LossHessian | None = None,
) -> GGNOperator:
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_n J_n^\top \nabla^2_f L\, J_n`.

    :math:`J_n` is the Jacobian of the model output for sample n w.r.t. the trainable
    parameters and :math:`\nabla^2_f L` the Hessian of ``loss_fn(output, y)`` w.r.t. the
    output, known in closed form for the registered losses (cross-entropy: :math:`c(\operatorname
    {diag} p - pp^\top)`; squared error: :math:`2c I`; BCE with logits:
    :math:`c\operatorname{diag}(\sigma(1-\sigma))`, ``c`` = 1/number of terms for a mean). For a
    convex loss :math:`G` is positive semi-definite; it equals the Hessian when the model is
    linear. Each product is :math:`Jv`, the loss Hessian and a ``vjp`` through the graph of the
    batch's forward pass (no second derivative of the model). A single batch keeps that graph
    for the operator's lifetime; with several batches each pass over ``data=`` re-runs each
    batch's forward pass, one batch in memory at a time. With ``data=`` the matrix is
    :math:`\sum_b w_b G_b / \sum_b w_b` over the batches (``w_b`` the batch size), with
    ``distributed=True`` over the union of the ranks' shards.

    Args:
        model: the network; called as ``model(X)``.
        loss_fn: ``loss_fn(output, y)``: ``nn.CrossEntropyLoss()``, ``nn.MSELoss()``,
            ``nn.BCEWithLogitsLoss()`` (``reduction`` ``"mean"`` or ``"sum"``) or their
            functional forms; another loss with ``loss_hessian=``.
        batch: ``(X, y)``, one batch; or ``None`` with ``data=``.
        data: an iterable of ``(X, y)`` batches (a list, a ``DataLoader``).
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: sum over the ranks of the initialised ``torch.distributed`` group.
        mode: ``"eval"`` (default), ``"train"`` or ``None``: the model's mode while it runs;
            flags and buffers are restored.
        loss_hessian: for a loss without a registered rule, ``loss_hessian(output, y, U)`` giving
            its Hessian w.r.t. the output (reduction included) applied to ``U`` of shape
            ``(k, *output.shape)``.

    Returns:
        A :class:`GGNOperator` (``@``, ``matvec``, ``matmat``, ``shape``, ``dtype``,
        ``to_scipy()``), usable by :func:`gradlab.curvature.trace` and the other estimators.

    Raises:
        TypeError: a loss without a known Hessian (the message lists the supported ones), a
            model that is not a module, a batch that is not ``(X, y)``.
        ValueError: both or neither of ``batch`` and ``data``, empty batches, targets of the
            wrong shape.

    Example:
        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> G = gl.ggn_operator(model, nn.CrossEntropyLoss(), (X, y))
        >>> G.shape, (G @ torch.ones(8)).shape
        ((8, 8), torch.Size([8]))
    """
    return _operator(
        "ggn_operator",
        model,
        loss_fn,
        batch,
        "ggn",
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        mode=mode,
        loss_hessian=loss_hessian,
    )


def fisher_operator(
    model: nn.Module,
    loss_fn: Any,
    batch: tuple[Any, torch.Tensor] | None = None,
    *,
    kind: str = "empirical",
    mc_samples: int = 1,
    generator: GeneratorArg = None,
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    mode: str | None = "eval",
) -> GGNOperator:
    r"""The Fisher: empirical (:math:`c\sum_n g_n g_n^\top`) or Monte-Carlo, as an operator.

    ``kind="empirical"``: :math:`F = c \sum_n \nabla_\theta \ell_n \nabla_\theta \ell_n^\top`
    with :math:`\ell_n = \ell(f_n, y_n)` the loss of sample n at its true target and ``c`` the
    loss's reduction factor (1 for a sum, 1/number of terms for a mean), as curvlinops defines
    it. ``kind="mc"``: :math:`F = \frac{c}{S} \sum_n \sum_s \nabla_\theta \ell(f_n, \hat y_{ns})
    \nabla_\theta \ell(f_n, \hat y_{ns})^\top` with ``S = mc_samples`` targets drawn from the
    model's predictive distribution (categorical for cross-entropy, :math:`N(f, I/2)` for squared
    error, Bernoulli for BCE), once per operator from ``generator``: a fixed matrix whose
    expectation is the GGN (the true Fisher). Products as :func:`ggn_operator`'s: ``jvp``, a
    rank-S output matrix, ``vjp``.

    Args:
        model, loss_fn, batch, data, batch_weight, distributed, mode: as in
            :func:`ggn_operator` (a registered loss is needed).
        kind: ``"empirical"`` or ``"mc"``.
        mc_samples: targets drawn per sample for ``"mc"``.
        generator: a ``torch.Generator`` or an int seed for ``"mc"``.

    Returns:
        A :class:`GGNOperator`.

    Raises:
        TypeError, ValueError: as :func:`ggn_operator`; unknown ``kind``, bad ``mc_samples``.

    Example:
        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> F = gl.fisher_operator(model, nn.MSELoss(), (X, y), kind="mc", generator=0)
        >>> F.shape
        (4, 4)
    """
    fn = "fisher_operator"
    check_choice(fn, "kind", kind, ("empirical", "mc"))
    check_sampling(fn, "kind", kind, mc_samples, generator)
    return _operator(
        fn,
        model,
        loss_fn,
        batch,
        kind,
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        mode=mode,
        mc_samples=mc_samples,
        generator=generator,
    )


def ggn_diagonal(
    model: nn.Module,
    loss_fn: Any,
    batch: tuple[Any, torch.Tensor] | None = None,
    *,
    method: str = "exact",
    mc_samples: int = 1,
    generator: GeneratorArg = None,
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    mode: str | None = "eval",
) -> dict[str, torch.Tensor]:
    r"""Diagonal of the GGN (``"exact"``) or of the Monte-Carlo Fisher (``"mc"``), per parameter.

    ``"exact"`` (BackPACK's ``DiagGGNExact``): :math:`\operatorname{diag} G = \sum_n \sum_j
    (J_n^\top s_{jn})^2` with :math:`S_n = [s_{1n}, \dots]` a square root of the loss Hessian
    w.r.t. sample n's output (:math:`S_n S_n^\top = c\nabla^2_f \ell`; C - 1 columns for
    C-class cross-entropy, the Hessian's rank, D for a D-output squared error). ``"mc"``
    (``DiagGGNMC``): the same with :math:`S_n` replaced by ``mc_samples`` gradients at targets
    drawn from the model's predictive distribution (scaled by :math:`\sqrt{c/S}`), an unbiased
    estimate, equal to the diagonal of :func:`fisher_operator` with ``kind="mc"`` and the same
    ``generator``. No product of the full matrix: when every trainable parameter sits in an
    ``nn.Linear`` or ``nn.Conv2d`` called once, the columns are backpropagated to the layer
    outputs and each sample's weight gradient is formed there from the layer input (conv
    patches); otherwise each column is a per-sample vector-Jacobian product, vmapped over the
    samples.

    Args:
        model, loss_fn, batch, data, batch_weight, distributed, mode: as in
            :func:`ggn_operator` (a registered loss is needed).
        method: ``"exact"`` or ``"mc"``.
        mc_samples: targets drawn per sample for ``"mc"``.
        generator: a ``torch.Generator`` or an int seed for ``"mc"``.

    Returns:
        A dict ``{parameter name: diagonal}``, each shaped like its parameter.

    Raises:
        TypeError, ValueError: as :func:`ggn_operator`; unknown ``method``, bad ``mc_samples``.

    Example:
        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> d = gl.ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y))
        >>> {k: tuple(v.shape) for k, v in d.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    fn = "ggn_diagonal"
    check_choice(fn, "method", method, ("exact", "mc"))
    check_sampling(fn, "method", method, mc_samples, generator)
    op = _operator(
        fn,
        model,
        loss_fn,
        batch,
        "ggn" if method == "exact" else "mc",
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        mode=mode,
        mc_samples=mc_samples,
        generator=generator,
    )
    return op._unflatten(op._exact_diagonal(), op.names)  # type: ignore[no-any-return]
