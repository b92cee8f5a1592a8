"""The general path: exact per-sample gradients of one module by ``torch.func``.

For a module without a closed-form rule (an LSTM, ``nn.MultiheadAttention``, a custom module)
the engine keeps the call's inputs and the gradients w.r.t. its outputs. The per-sample gradient
of the module's parameters ``theta`` is then, for each sample ``i``,

    g_i = grad_theta sum_k < f_k(theta, x_i), d_ik >

(``f_k`` the module's tensor outputs, ``d_ik`` their gradients), computed by
``vmap(grad(...))`` over the module's own :func:`torch.func.functional_call` on one sample at a
time (batch dimension of size 1 put back), or, where an operation has no ``vmap`` rule, by a
loop of :func:`torch.autograd.grad` over the samples. Only that module is replayed, not the
model. Costs one extra forward and backward of the module.

Batch dimensions: 0 for every tensor whose size there is the batch size; ``batch_first=False``
recurrent layers and attention put theirs at 1 (their states ``h``/``c`` always at 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["Replay", "batch_dims", "dropout_in", "replay_grads"]


def _dim0(t: Any, b: int) -> int | None:
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b:
        return 0
    return None


def batch_dims(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> tuple[int, list[int | None], list[int | None]]:
    """``(B, dims of the flattened (args, kwargs), dims of the flattened output)``.

    Raises:
        ValueError: the batch size cannot be read from the first input.
    """
    flat_in, _ = tree_flatten((args, kwargs))
    flat_out, _ = tree_flatten(out)
    first = next((t for t in flat_in if isinstance(t, torch.Tensor)), None)
    seq_dim = 0
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) and not module.batch_first:
        seq_dim = 1
    if first is None or first.dim() <= seq_dim:
        raise ValueError(
            f"PerSampleGradients: cannot read the batch size of {type(module).__name__}'s input "
            f"(got {None if first is None else tuple(first.shape)}); its first tensor argument "
            f"must be batched (batch dimension {seq_dim})"
        )
    b = first.shape[seq_dim]
    in_dims: list[int | None]
    out_dims: list[int | None]
    if isinstance(module, nn.RNNBase):
        # input at seq_dim; hx (h0 or (h0, c0)) at 1; outputs: (out at seq_dim, h_n (, c_n) at 1)
        in_dims = [seq_dim, *(1 if isinstance(t, torch.Tensor) else None for t in flat_in[1:])]
        out_dims = [seq_dim, *(1 for _ in flat_out[1:])]
        return b, in_dims, out_dims
    if isinstance(module, nn.MultiheadAttention):
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]
        bound = dict(zip(names, args), **kwargs)
        in_dims = []
        for t in flat_in:
            key = next((k for k, v in bound.items() if v is t), None)
            if key in ("query", "key", "value"):
                in_dims.append(seq_dim)
            elif key == "attn_mask" and isinstance(t, torch.Tensor):
                if t.dim() == 3:
                    raise ValueError(
                        "PerSampleGradients: a 3-d attn_mask (batch x heads, L, S) of "
                        "nn.MultiheadAttention mixes the batch and head dimensions; pass a 2-d "
                        "mask or a key_padding_mask"
                    )
                in_dims.append(None)
            else:
                in_dims.append(_dim0(t, b))
        out_dims = [seq_dim, *(_dim0(t, b) for t in flat_out[1:])]
        return b, in_dims, out_dims
    return b, [_dim0(t, b) for t in flat_in], [_dim0(t, b) for t in flat_out]


def dropout_in(module: nn.Module) -> str | None:
    """A description of active dropout inside ``module`` (a replay would draw other masks)."""
    if not module.training:
        return None
    p = getattr(module, "dropout", 0.0)
    if isinstance(p, float) and p > 0:
        return f"{type(module).__name__}(dropout={p})"
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
            return f"{name} ({m!r})"
    return None


class Replay:
    """One call of a fallback module: its inputs and the gradients w.r.t. its outputs."""

    __slots__ = ("b", "flat_in", "grads", "in_dims", "in_spec", "module", "out_dims", "owner")

    def __init__(
        self,
        module: nn.Module,
        owner: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
    ) -> None:
        self.module = module
        self.owner = owner
        self.b, self.in_dims, self.out_dims = batch_dims(module, args, kwargs, out)
        flat_in, self.in_spec = tree_flatten((args, kwargs))
        self.flat_in = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat_in]
        self.grads: dict[int, torch.Tensor] = {}

    def receive(self, k: int, g: torch.Tensor) -> None:
        self.grads[k] = g.detach() if k not in self.grads else self.grads[k] + g.detach()


def _loss(
    rep: Replay,
    params: dict[str, torch.Tensor],
    batched: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    unsqueeze: bool,
) -> torch.Tensor:
    leaves = list(rep.flat_in)
    pos = [k for k, dim in enumerate(rep.in_dims) if dim is not None]
    for k, v in zip(pos, batched):
        leaves[k] = v.unsqueeze(rep.in_dims[k]) if unsqueeze else v  # type: ignore[arg-type]
    args, kwargs = tree_unflatten(leaves, rep.in_spec)
    out_leaves, _ = tree_flatten(functional_call(rep.module, params, args, kwargs))
    total = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
    for k, g in zip(sorted(rep.grads), grads):
        dim = rep.out_dims[k]
        gk = g.unsqueeze(dim) if unsqueeze else g  # type: ignore[arg-type]
        total = total + (out_leaves[k] * gk).sum()
    return total


def replay_grads(rep: Replay, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: (B, *p.shape)}`` of ``params`` (names relative to the
    module) for the replayed call; ``vmap(grad)``, or a loop where vmap cannot run."""
    for k in rep.grads:
        if rep.out_dims[k] is None:
            raise ValueError(
                f"PerSampleGradients: output {k} of {rep.owner} ({type(rep.module).__name__}) "
                f"has no batch dimension but receives a gradient; per-sample gradients of this "
                f"module need batched outputs: use per_sample_grads on a function you define"
            )
    # functional_call (torch 2.13) can leave plain tensors in place of the parameters of a
    # submodule that appears twice in the tree: put every parameter back afterwards.
    saved = [(m, dict(m._parameters)) for m in rep.module.modules()]
    try:
        return _replay_grads(rep, params)
    finally:
        for m, ps in saved:
            for n, p in ps.items():
                if m._parameters.get(n) is not p:
                    m._parameters[n] = p


def _replay_grads(rep: Replay, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in params.items()}
    batched = [t for t, dim in zip(rep.flat_in, rep.in_dims) if dim is not None]
    b_dims = [dim for dim in rep.in_dims if dim is not None]
    ks = sorted(rep.grads)
    grads = [rep.grads[k] for k in ks]
    g_dims = [rep.out_dims[k] for k in ks]
    if not grads:
        return {
            n: torch.zeros(rep.b, *p.shape, dtype=p.dtype, device=p.device)
            for n, p in params.items()
        }
    try:
        with warnings.catch_warnings():  # "performance drop": ops without a batching rule
            warnings.filterwarnings("ignore", message="There is a performance drop")
            fn = vmap(
                grad(lambda p, x, g: _loss(rep, p, x, g, True)),
                in_dims=(None, b_dims, g_dims),
            )
            return fn(params, batched, grads)
    except (RuntimeError, NotImplementedError):
        pass  # an operation without a batching rule: one sample at a time
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(rep.b):
        p_i = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        x_i = [t.narrow(dim, i, 1) for t, dim in zip(batched, b_dims)]  # type: ignore[arg-type]
        g_i = [t.narrow(dim, i, 1) for t, dim in zip(grads, g_dims)]  # type: ignore[arg-type]
        with torch.enable_grad():
            total = _loss(rep, p_i, x_i, g_i, False)
            gs = torch.autograd.grad(total, list(p_i.values()), allow_unused=True)
        for (n, p), g in zip(p_i.items(), gs):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}
