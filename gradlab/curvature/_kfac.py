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
factor columns: C for C-class cross-entropy), only to the layer outputs (no parameter
gradients). Products cost :math:`O(d_{out}^2 d_{in} + d_{out} d_{in}^2)` per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradlab.curvature import _distributed as dist_
from gradlab.curvature._args import BatchWeight, GeneratorArg, check_choice, check_positive
from gradlab.curvature._base import CurvatureOperator, Pieces
from gradlab.curvature._ggn import GGNOperator

__all__ = ["KFACOperator", "kfac_operator"]

SUPPORTED = (nn.Linear, nn.Conv2d)
FISHERS = {"type-2": "ggn", "mc": "mc", "empirical": "empirical"}


def layer_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(N, positions, C_in * kh * kw)`` patches, ordered like ``weight.reshape(C_out, -1)``."""
    padding = module.padding
    assert not isinstance(padding, str)  # refused in kfac_operator
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    return cols.transpose(1, 2)


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
        self._applied = {key: self._damped(A, B) for key, (A, B) in factors.items()}

    def _damped(
        self, A: torch.Tensor | None, B: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        def one(M: torch.Tensor) -> torch.Tensor:
            M = M + self.damping * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            return torch.linalg.inv(M) if self._inverse else M

        return (None if A is None else one(A)), one(B)

    def inverse(self, damping: float | None = None) -> KFACOperator:
        r"""The inverse :math:`(A + \lambda I)^{-1} \otimes (B + \lambda I)^{-1}` per block.

        ``damping`` :math:`\lambda` (default: this operator's) is added to each factor, as in
        curvlinops' ``KFACInverseLinearOperator(K, damping=)``; with the same damping,
        ``K.inverse() @ (K @ v) == v``.

        Raises:
            ValueError: a negative damping, or a singular factor without damping.
        """
        lam = self.damping if damping is None else damping
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(
                f"{self._fn}.inverse: damping must be a float >= 0, got {lam!r}. Pass e.g. "
                f"damping=1e-3"
            )
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


@contextlib.contextmanager
def _capture(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Any, Any]]]]:
    """Record each layer's (input, output) per call; the hooks are removed on exit."""
    seen: dict[str, list[tuple[Any, Any]]] = {name: [] for name in layers}
    handles = []
    for name, module in layers.items():

        def hook(m: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            seen[name].append((inputs[0].detach(), output))

        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


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
    check_positive(fn, "mc_samples", mc_samples)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"{fn}: damping must be a float >= 0, got {damping!r}. Pass e.g. 1e-3")
    if fisher != "mc" and (mc_samples != 1 or generator is not None):
        raise ValueError(
            f"{fn}: mc_samples= and generator= are used by fisher='mc' only, got "
            f"fisher={fisher!r}; drop them or pass fisher='mc'"
        )
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
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            raise ValueError(
                f"{fn}: model must use Conv2d layers with groups=1, integer padding and "
                f"padding_mode='zeros', got {layer!r} ({module}). Use gl.ggn_operator for it"
            )
        blocks.append((layer, "weight" if p is module.weight else "bias"))
        layers[layer] = module
    dtype, device = ggn.dtype, ggn.device
    sums: dict[str, list[torch.Tensor | None]] = {}
    total = 0.0
    for b, index, w in ggn._iter_data():
        X, y = ggn._unpack(ggn._batch if index is None else b, index)
        with ggn._mode_ctx(), torch.enable_grad(), _capture(layers) as seen:
            out = model(X)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{fn}: the model output must have shape (N, C), got {got}. Flatten it or use "
                f"gl.ggn_operator"
            )
        Phi = ggn._factors(out.detach(), y, index)  # (m, N, C)
        outputs = [o for name in layers for _, o in seen[name]]
        grads: list[list[torch.Tensor]] = [[] for _ in outputs]
        for j in range(Phi.shape[0]):
            gs = torch.autograd.grad(
                out,
                outputs,
                Phi[j],
                retain_graph=j < Phi.shape[0] - 1,
                allow_unused=True,
                materialize_grads=True,
            )
            for lst, g in zip(grads, gs):
                lst.append(g)
        pos = 0
        for name, module in layers.items():
            A: torch.Tensor | None = None
            d_out = layer_weight(module).shape[0]
            B = torch.zeros(d_out, d_out, dtype=dtype, device=device)
            for x, _ in seen[name]:
                if isinstance(module, nn.Conv2d):
                    x = _patches(module, x)  # (N, R, d_in)
                x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, R, d_in)
                if kfac_approx == "expand":
                    rows, scale = x.reshape(-1, x.shape[-1]), x.shape[1]
                else:
                    rows, scale = x.mean(1), 1
                cov = rows.T @ rows / (x.shape[0] * scale)
                A = cov if A is None else A + cov
                for g in grads[pos]:
                    if isinstance(module, nn.Conv2d):
                        g = g.flatten(2).transpose(1, 2)  # (N, positions, C_out)
                    g = g.reshape(g.shape[0], -1, g.shape[-1])
                    rows = g.reshape(-1, g.shape[-1]) if kfac_approx == "expand" else g.sum(1)
                    B += rows.T @ rows
                pos += 1
            prev = sums.get(name)
            if prev is None:
                sums[name] = [None if A is None else A * w, B * w]
            else:
                if A is not None:
                    prev[0] = A * w if prev[0] is None else prev[0] + A * w
                prev[1] = B * w if prev[1] is None else prev[1] + B * w
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
        trained = {kind for layer, kind in blocks if layer == name}
        factors[name] = (
            None if A_sum is None or "weight" not in trained else A_sum / total,
            B_sum / total,
        )
    try:
        return KFACOperator(fn, ggn.params, ggn.names, blocks, factors, float(damping))
    except torch.linalg.LinAlgError as e:  # pragma: no cover - only inverse() inverts
        raise ValueError(f"{fn}: {e}") from None
