r"""The generalized Gauss-Newton and the Fisher as linear operators: :math:`J^\top M J`.

For a model :math:`f(\theta, x)` and a loss :math:`L = c\sum_n \ell(f_n, y_n)`, every one of these
matrices is :math:`\sum_n J_n^\top M_n J_n` with :math:`J_n = \partial f_n/\partial\theta`:

- GGN: :math:`M_n = c\,\nabla^2_f \ell(f_n, y_n)`, the loss Hessian w.r.t. the output;
- empirical Fisher: :math:`M_n = c\, g_n g_n^\top`, :math:`g_n = \nabla_f \ell(f_n, y_n)`;
- Monte-Carlo Fisher: :math:`M_n = \frac{c}{S}\sum_s g_{ns} g_{ns}^\top` with
  :math:`g_{ns} = \nabla_f \ell(f_n, \hat y_{ns})`, :math:`\hat y_{ns} \sim p(y \mid f_n)`
  (drawn once per operator, so it is a fixed matrix; unbiased for the GGN).

A product is a forward-mode ``jvp`` (:math:`Jv`, all k vectors of a chunk vmapped), the output
matrix, and a ``vjp`` (:math:`J^\top u`) through the graph of one forward pass kept per batch:
no double backward through the model. Cost per product: about one forward with tangents plus
one backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
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
from gradlab.curvature._losses import LossRule, check_targets, loss_rule
from gradlab.curvature._state import model_state

__all__ = ["GGNOperator", "fisher_operator", "ggn_diagonal", "ggn_operator"]

LossHessian = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_dot(R: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``<R[s, n], U[k, n]>`` summed over the output dims: shape ``(k, S, N)``."""
    k, S, N = U.shape[0], R.shape[0], R.shape[1]
    return torch.einsum("sni,kni->ksn", R.reshape(S, N, -1), U.reshape(k, N, -1))


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
        self._loss_fn = loss_fn
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
        model, names = self._model, self.names

        def f(*params: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, dict(zip(names, params)), (X,), strict=False)

        return f

    def _mode_ctx(self) -> contextlib.AbstractContextManager[None]:
        return model_state(self._model, self._mode)

    def _prepare(self, batch: Any, index: int | None) -> Any:
        X, y = self._unpack(self._batch if index is None else batch, index)
        f = self._forward(X)
        primals = tuple(p.detach() for p in self.params)
        with self._mode_ctx(), torch.enable_grad():
            out, vjp_fn = torch.func.vjp(f, *primals)  # type: ignore[misc]
        out = out.detach()
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            raise ValueError(
                f"{self._fn}: the model must return a batched output tensor (N, ...), got "
                f"{type(out).__name__ if not isinstance(out, torch.Tensor) else 'a 0-dim tensor'}"
            )
        return f, primals, vjp_fn, self._output_matrix(out, y, index)

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
            return lambda U: c * rule.hessian(out, y, U)
        if self._kind == "empirical":
            R = rule.grad(out, y).unsqueeze(0)
        else:
            R = self._mc_grads(out, index)
            c = c / self._mc
        return lambda U: (
            c
            * torch.einsum(
                "ksn,sn...->kn...", per_sample_dot(R, U), R.reshape(R.shape[0], R.shape[1], -1)
            ).reshape(U.shape)
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
        that sample's Jacobian (vmapped over samples, in chunks), no product of the full
        matrix. A custom ``loss_hessian=`` has no square root: then n products.
        """
        if self._rule is None:
            return super()._exact_diagonal()
        if self._linear_layout() is not None:
            return self._linear_diagonal()
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
            self._count(self.n)
        self._finish([out])
        return out

    def _linear_layout(self) -> list[tuple[nn.Linear, str]] | None:
        """Each parameter's ``nn.Linear`` and ``"weight"``/``"bias"``, or None if one is not."""
        owner = {id(p): m for m in self._model.modules() for p in m.parameters(recurse=False)}
        layout = []
        for p in self.params:
            m = owner.get(id(p))
            if not isinstance(m, nn.Linear):
                return None
            layout.append((m, "weight" if p is m.weight else "bias"))
        return layout

    def _linear_diagonal(self) -> torch.Tensor:
        """The exact diagonal for parameters that all sit in ``nn.Linear`` layers.

        BackPACK's rule: one backward of each factor column to the layer outputs :math:`g`;
        the weight's per-sample gradient is :math:`g_n a_n^\top` (summed over positions for
        inputs with more dimensions), so its square needs no per-sample Jacobian.
        """
        layout = self._linear_layout()
        assert layout is not None
        layers = list(dict.fromkeys(m for m, _ in layout))
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for batch, index, w in self._iter_data():
            X, y = self._unpack(self._batch if index is None else batch, index)
            seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

            def hook(m: nn.Module, inputs: Any, output: Any, seen: Any = seen) -> None:
                seen[m].append((inputs[0].detach(), output))

            handles = [m.register_forward_hook(hook) for m in layers]
            try:
                with self._mode_ctx(), torch.enable_grad():
                    f = self._model(X)
            finally:
                for h in handles:
                    h.remove()
            if any(len(seen[m]) != 1 for m in layers):  # a layer called twice or never
                return self._vmap_diagonal()
            Phi = self._factors(f.detach(), y, index)
            outputs = [seen[m][0][1] for m in layers]
            sq: dict[tuple[nn.Module, str], torch.Tensor] = {}
            try:  # all factor columns in one vmapped backward: (m, *output) per layer
                grads = list(
                    torch.autograd.grad(
                        f,
                        outputs,
                        Phi,
                        is_grads_batched=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                )
            except RuntimeError:  # an op without a batching rule: one column at a time
                cols = [
                    torch.autograd.grad(
                        f,
                        outputs,
                        Phi[j],
                        retain_graph=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    for j in range(Phi.shape[0])
                ]
                grads = [torch.stack(c) for c in zip(*cols)]
            for m, g in zip(layers, grads):
                a = seen[m][0][0]
                k, N = g.shape[0], g.shape[1]
                g4 = g.reshape(k, N, -1, g.shape[-1])  # (m, N, positions, out)
                a3 = a.reshape(N, -1, a.shape[-1])
                if g4.shape[2] == 1:
                    wsq = torch.einsum("kno,ni->oi", g4[:, :, 0] ** 2, a3[:, 0] ** 2)
                else:
                    wsq = (torch.einsum("knto,nti->knoi", g4, a3) ** 2).sum((0, 1))
                sq[(m, "weight")] = wsq
                sq[(m, "bias")] = (g4.sum(2) ** 2).sum((0, 1))
            for i, key in enumerate(layout):
                out[self.offsets[i] : self.offsets[i + 1]].add_(sq[key].reshape(-1), alpha=w)
            self._count(self.n)
        self._finish([out])
        return out

    def _batch_products(self, state: Any, V: Pieces) -> Pieces:
        f, primals, vjp_fn, M = state

        def jvp(*tangents: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(f, primals, tangents)[1]

        if V[0].shape[0] == 1:  # one vector: no vmap (its overhead dominates small models)
            with self._mode_ctx():
                JV = jvp(*[v[0] for v in V]).unsqueeze(0)
            return [h.unsqueeze(0) for h in vjp_fn(M(JV)[0])]
        with self._mode_ctx():
            JV = torch.func.vmap(jvp)(*V)
        return list(torch.func.vmap(vjp_fn)(M(JV)))


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
    linear. Each product is a ``jvp``, the loss Hessian and a ``vjp`` (no double backward
    through the model). With ``data=`` the matrix is :math:`\sum_b w_b G_b / \sum_b w_b` over
    the batches (``w_b`` the batch size), with ``distributed=True`` over the union of the ranks'
    shards.

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
    check_positive(fn, "mc_samples", mc_samples)
    if kind == "empirical" and (mc_samples != 1 or generator is not None):
        raise ValueError(
            f"{fn}: mc_samples= and generator= are used by kind='mc' only, got kind='empirical'; "
            f"drop them or pass kind='mc'"
        )
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
    w.r.t. sample n's output (:math:`S_n S_n^\top = c\nabla^2_f \ell`; C columns for C-class
    cross-entropy, D for a D-output squared error). ``"mc"`` (``DiagGGNMC``): the same with
    :math:`S_n` replaced by ``mc_samples`` gradients at targets drawn from the model's predictive
    distribution (scaled by :math:`\sqrt{c/S}`), an unbiased estimate, equal to the diagonal of
    :func:`fisher_operator` with ``kind="mc"`` and the same ``generator``. Each column is one
    per-sample vector-Jacobian product, vmapped over the samples (no product of the full
    matrix, no double backward).

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
    check_positive(fn, "mc_samples", mc_samples)
    if method == "exact" and (mc_samples != 1 or generator is not None):
        raise ValueError(
            f"{fn}: mc_samples= and generator= are used by method='mc' only, got "
            f"method='exact'; drop them or pass method='mc'"
        )
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
