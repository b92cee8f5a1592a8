r"""KFAC: a block-diagonal Kronecker approximation of the GGN or the Fisher, and its inverse.

For a layer :math:`s = W a` (``nn.Linear``; ``nn.Conv2d`` on its unfolded patches) the block of
the curvature matrix :math:`\sum_n J_n^\top M_n J_n` w.r.t. :math:`W` is approximated by
:math:`B \otimes A` (row-major ``W.flatten()``) with

- :math:`A = \frac1{N R} \sum_{n,r} a_{nr} a_{nr}^\top`, the layer inputs (R weight-sharing
  positions: conv output positions, sequence steps; ``"reduce"`` averages over them first),
- :math:`B = \sum_{n,r} \sum_j g_{nrj} g_{nrj}^\top`, the output-gradients
  :math:`g = \partial (f_n^\top \phi_{jn}) / \partial s_{nr}` of the factors :math:`\Phi` of the
  output matrix: the loss Hessian's square root (``"type-2"``), sampled gradients (``"mc"``)
  or the gradient at the true target (``"empirical"``); ``"reduce"`` sums over positions first.

The bias of a layer has block :math:`B`. The conventions are curvlinops' ``KFACLinearOperator``
(``separate_weight_and_bias=True``). One forward and ``m`` backward passes per batch (``m`` the
factor columns: C - 1 for C-class cross-entropy), only to the layer outputs (no parameter
gradients). Products cost :math:`O(d_{out}^2 d_{in} + d_{out} d_{in}^2)` per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradlab.curvature import _distributed as dist_
from gradlab.curvature._args import BatchWeight, GeneratorArg, check_choice
from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._ggn import GGNOperator, check_sampling
from gradlab.curvature._layers import SUPPORTED, input_columns, layer_problem, output_columns

__all__ = ["KFACOperator", "kfac_operator"]

FISHERS = {"type-2": "ggn", "mc": "mc", "empirical": "empirical"}


class KFACOperator(CurvatureOperator):
    """KFAC as a linear operator (block diagonal, Kronecker-factored blocks).

    Made by :func:`gradlab.kfac_operator`. ``factors`` maps each layer's name to ``(A, B)`` (``A``
    None for a layer with only a bias trained); :meth:`inverse` gives the inverse operator.

    Example:
        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> K = gl.kfac_operator(model, nn.CrossEntropyLoss(), (X, y), damping=1e-3)
        >>> {name: (tuple(A.shape), tuple(B.shape)) for name, (A, B) in K.factors.items()}
        {'0': ((3, 3), (4, 4)), '2': ((4, 4), (2, 2))}
        >>> K.shape, K.damping, type(K.inverse()).__name__
        ((26, 26), 0.001, 'KFACOperator')

        One sample through one bias-free layer: :math:`A = x x^\\top` and the Kronecker
        product is exact, so KFAC equals the GGN:

        >>> layer = nn.Linear(3, 2, bias=False)
        >>> x, t = torch.randn(1, 3), torch.randn(1, 2)
        >>> K1 = gl.kfac_operator(layer, nn.MSELoss(), (x, t))
        >>> torch.allclose(K1.factors[""][0], x.T @ x)
        True
        >>> G1 = gl.ggn_operator(layer, nn.MSELoss(), (x, t))
        >>> torch.allclose(K1.matmat(torch.eye(6)), G1.matmat(torch.eye(6)), atol=1e-5)
        True
    """

    def __init__(
        self,
        fn: str,
        params: list[torch.Tensor],
        names: list[str],
        blocks: list[tuple[str, str]],
        factors: dict[str, tuple[torch.Tensor | None, torch.Tensor]],
        damping: float,
        inverse: bool = False,
    ) -> None:
        super().__init__(fn, [p.shape for p in params], params[0].dtype, params[0].device)
        self.params, self.names = params, names
        self._blocks = blocks  # per parameter: (layer name, "weight" | "bias")
        self.factors = factors
        self.damping = damping
        self._inverse = inverse
        # the damped (or inverted) factors the products apply: at once for an inverse (so a
        # singular factor is refused by inverse()), on the first product otherwise
        self._applied: dict[str, tuple[torch.Tensor | None, torch.Tensor]] | None = (
            self._damped_factors() if inverse else None
        )

    def _damped_factors(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        def one(M: torch.Tensor) -> torch.Tensor:
            if self.damping != 0:
                M = M.clone()
                M.diagonal().add_(self.damping)
            if not self._inverse:
                return M
            # symmetric positive definite: a Cholesky factor, then its inverse (half the
            # work of a general inverse); a failure is a singular (or indefinite) factor
            return torch.cholesky_inverse(torch.linalg.cholesky(M))

        return {
            key: (None if A is None else one(A), one(B)) for key, (A, B) in self.factors.items()
        }

    def inverse(self, damping: float | None = None) -> KFACOperator:
        r"""The inverse :math:`(A + \lambda I)^{-1} \otimes (B + \lambda I)^{-1}` per block.

        ``damping`` :math:`\lambda` (default: this operator's) is added to each factor, as in
        curvlinops' ``KFACInverseLinearOperator(K, damping=)``; with the same damping,
        ``K.inverse() @ (K @ v) == v``.

        Raises:
            ValueError: a negative damping, or a singular factor without damping.
        """
        lam = self.damping if damping is None else damping
        _check_damping(f"{self._fn}.inverse", lam)
        try:
            return KFACOperator(
                self._fn, self.params, self.names, self._blocks, self.factors, float(lam), True
            )
        except torch.linalg.LinAlgError:
            raise ValueError(
                f"{self._fn}.inverse: a Kronecker factor is singular at damping={lam!r}; pass "
                f"damping > 0"
            ) from None

    def _prepare(self, batch: Any, index: int | None) -> None:
        return None

    def _batch_products(self, state: None, V: Pieces) -> Pieces:
        if self._applied is None:
            self._applied = self._damped_factors()
        out = []
        for (layer, kind), v in zip(self._blocks, V):
            A, B = self._applied[layer]
            k = v.shape[0]
            if kind == "bias":
                out.append(torch.einsum("ij,kj->ki", B, v))
            else:
                assert A is not None
                w = v.reshape(k, B.shape[0], -1)
                out.append((B @ w @ A).reshape(v.shape))
        return out


def _check_damping(fn: str, damping: Any) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(
            f"{fn}: damping must be a float >= 0, got {damping!r}. Pass e.g. damping=1e-3"
        )


def _add_gram(acc: torch.Tensor | None, cols: torch.Tensor, alpha: float) -> torch.Tensor:
    """``acc + alpha * cols cols^T`` (in place into ``acc``; a new tensor if it is None)."""
    if acc is not None:
        return acc.addmm_(cols, cols.T, alpha=alpha)
    if alpha == 1.0:
        return torch.mm(cols, cols.T)
    if cols.numel() < cols.shape[0] ** 2:  # scale the smaller of the columns and the result
        return torch.mm(cols, cols.T * alpha)
    return torch.mm(cols, cols.T).mul_(alpha)


def kfac_operator(
    model: nn.Module,
    loss_fn: Any,
    batch: tuple[Any, torch.Tensor] | None = None,
    *,
    fisher: str = "type-2",
    mc_samples: int = 1,
    generator: GeneratorArg = None,
    kfac_approx: str = "expand",
    damping: float = 0.0,
    data: Iterable[Any] | None = None,
    batch_weight: BatchWeight = None,
    distributed: bool = False,
    mode: str | None = "eval",
) -> KFACOperator:
    r"""KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) as an operator.

    Every trainable parameter must belong to an ``nn.Linear`` or ``nn.Conv2d`` (in any
    container; ``groups=1``); each layer's block is :math:`(B + \lambda I) \otimes (A + \lambda
    I)` (see the module docs for :math:`A`, :math:`B`; ``damping`` :math:`\lambda`), the bias
    block :math:`B + \lambda I`, and blocks of different layers are zero.

    Args:
        model: the network, called as ``model(X)``; its output must be ``(N, C)``.
        loss_fn: a registered loss (see :func:`gradlab.ggn_operator`).
        batch: ``(X, y)``; or ``None`` with ``data=``.
        fisher: ``"type-2"`` (the GGN's exact loss-Hessian square root), ``"mc"``
            (``mc_samples`` sampled targets per sample) or ``"empirical"``.
        mc_samples: targets drawn per sample for ``"mc"``.
        generator: a ``torch.Generator`` or an int seed for ``"mc"`` (an int is used as the
            seed itself, as curvlinops' ``seed=``).
        kfac_approx: ``"expand"`` or ``"reduce"``, the treatment of weight sharing (conv
            positions, sequence steps), as curvlinops defines them.
        damping: :math:`\lambda \ge 0`, added to every factor.
        data: an iterable of ``(X, y)`` batches (factors averaged, weighted by batch size).
        batch_weight: ``batch_weight(batch) -> float`` (default: the batch size).
        distributed: each rank passes its shard as ``data=``; the weighted factor sums and the
            total weight are all-reduced, so every rank gets the factors of the union.
        mode: the model's mode while it runs (``"eval"``, ``"train"`` or ``None``).

    Returns:
        A :class:`KFACOperator` with ``factors``, ``@``, ``matvec``, ``matmat``, ``to_scipy()``
        and ``inverse(damping=)``.

    Raises:
        ValueError: a trainable parameter outside a Linear/Conv2d (named, with its layer type),
            grouped convolutions, outputs that are not ``(N, C)``, bad ``fisher``.
        TypeError: as :func:`gradlab.ggn_operator`.

    Example:
        >>> import gradlab as gl
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> K = gl.kfac_operator(model, nn.CrossEntropyLoss(), (X, y), damping=1e-3)
        >>> v = torch.randn(K.shape[0])
        >>> torch.allclose(K.inverse() @ (K @ v), v, atol=1e-3)
        True
    """
    fn = "kfac_operator"
    check_choice(fn, "fisher", fisher, tuple(FISHERS))
    check_choice(fn, "kfac_approx", kfac_approx, ("expand", "reduce"))
    _check_damping(fn, damping)
    check_sampling(fn, "fisher", fisher, mc_samples, generator)
    # the GGN operator checks model, loss, batch/data and holds the output-matrix factors
    ggn = GGNOperator(
        fn,
        model,
        loss_fn,
        batch,
        kind=FISHERS[fisher],
        data=data,
        batch_weight=batch_weight,
        distributed=distributed,
        mode=mode,
        mc_samples=mc_samples,
        generator=generator,
    )
    owner = {id(p): (name, m) for name, m in model.named_modules() for p in m.parameters(False)}
    blocks: list[tuple[str, str]] = []
    layers: dict[str, nn.Module] = {}
    for pname, p in zip(ggn.names, ggn.params):
        layer, module = owner[id(p)]
        if not isinstance(module, SUPPORTED):
            raise ValueError(
                f"{fn}: model must hold its trainable parameters in nn.Linear or nn.Conv2d "
                f"layers, got {pname!r} in a {type(module).__name__} ({layer!r}). Freeze it "
                f"(requires_grad_(False)) or use gl.ggn_operator"
            )
        if layer_problem(module) is not None:
            raise ValueError(
                f"{fn}: model must use Conv2d layers with groups=1, integer padding and "
                f"padding_mode='zeros', got {layer!r} ({module}). Use gl.ggn_operator for it"
            )
        blocks.append((layer, "weight" if p is module.weight else "bias"))
        layers[layer] = module
    with_A = {layer for layer, kind in blocks if kind == "weight"}
    reduce = kfac_approx == "reduce"
    sums: dict[str, list[torch.Tensor | None]] = {name: [None, None] for name in layers}
    total = 0.0
    for b, index, w in ggn._iter_data():
        passed = ggn._layer_pass(layers, b, index, flat_output=True)
        assert passed is not None
        seen, grads = passed
        for name, module in layers.items():
            acc = sums[name]
            for (x, _), g in zip(seen[name], grads[name]):
                if name in with_A:
                    cols, R = input_columns(module, x, reduce)
                    alpha = w / x.shape[0] if reduce else w / (x.shape[0] * R)
                    acc[0] = _add_gram(acc[0], cols, alpha)
                for chunk in g:  # the factor columns, in chunks
                    acc[1] = _add_gram(acc[1], output_columns(module, chunk, reduce), w)
        total += w
        ggn._count(1)
    if distributed:  # one all-reduce of every weighted sum and the total weight
        parts = [t for pair in sums.values() for t in pair if t is not None]
        flat = torch.cat([t.reshape(-1) for t in parts] + [torch.tensor([total]).to(parts[0])])
        dist_.all_reduce_sum(flat)
        for t, piece in zip(parts, flat[:-1].split([t.numel() for t in parts])):
            t.copy_(piece.view_as(t))
        total = float(flat[-1])
    factors: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for name, (A_sum, B_sum) in sums.items():
        assert B_sum is not None
        if total != 1.0:
            B_sum.div_(total)
            if A_sum is not None:
                A_sum.div_(total)
        factors[name] = (A_sum, B_sum)
    try:
        return KFACOperator(fn, ggn.params, ggn.names, blocks, factors, float(damping))
    except torch.linalg.LinAlgError as e:  # pragma: no cover - only inverse() inverts
        raise ValueError(f"{fn}: {e}") from None
