"""PerSampleGradients: per-sample gradient statistics of a model from one forward and backward.

The engine hooks every module that owns parameters. A forward hook keeps the module's input and
puts a gradient hook on its output (a node pre-hook: in-place safe, see
:func:`gradlab.hooks._engine.on_grad`); when the output's gradient arrives, the module's rule
(:mod:`gradlab.per_sample._registry`) turns input and output gradient into per-sample quantities
and both are dropped. Modules without a rule are replayed by ``torch.func`` once the backward
pass is over (:mod:`gradlab.per_sample._fallback`). Every hook is removed on exit.

A parameter used by one call of one module gets its statistics straight from the rule (ghost
norms where cheaper). A parameter used several times (a module called twice, a weight tied
between two modules) gets the per-sample gradient of every call summed first, then its
statistics: norms of sums, never sums of norms.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from gradlab._errors import GradlabError
from gradlab.hooks._engine import REPLAY, HandleBag, HookContext, _task_id, on_grad
from gradlab.per_sample._fallback import Replay, dropout_in, replay_grads
from gradlab.per_sample._gather import GatheredStats, gather
from gradlab.per_sample._registry import Rule, rule_for

__all__ = ["STATS", "PerSampleGradients"]

#: The statistics :class:`PerSampleGradients` can compute (its ``stats=`` argument).
STATS = ("norm", "grad", "sum_sq", "variance", "dot", "dot_mean")
_REDUCTIONS = ("mean", "sum")
_LOW = (torch.float16, torch.bfloat16)
_FN = "PerSampleGradients"
#: Per-sample gradients formed for statistics only wait, up to this many bytes, to be reduced
#: together with those of other parameters of their size (a few operations per step rather than
#: six per parameter: a CNN of small layers spends more on dispatching them than on the numbers).
_PENDING_BYTES = 4 << 20


@dataclass(eq=False)
class _Call:
    """One call of a module with a closed-form rule."""

    module: nn.Module
    owner: str
    rule: Rule
    a: torch.Tensor | None
    names: dict[str, str]  # local parameter name -> model parameter name (trainable ones)
    b: int
    d: torch.Tensor | None = None  # the output gradient as it came (kept for dot())


def _check_args(model: Any, stats: Any, loss_reduction: Any, scaler: Any) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}. For a plain "
            f"function of parameters use per_sample_grads(f, params, *batch)"
        )
    if isinstance(stats, str) or not isinstance(stats, Iterable):
        raise TypeError(
            f"{_FN}: stats must be a tuple of names, got {stats!r}. Write stats=({stats!r},)"
        )
    stats = tuple(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(
            f"{_FN}: stats must be names from {STATS}, got unknown {unknown!r}. "
            f"Pick from {', '.join(STATS)}"
        )
    if loss_reduction not in _REDUCTIONS:
        raise ValueError(
            f"{_FN}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}. Say how the "
            f"loss combines the per-sample losses l_i: 'mean' for (1/B) sum_i l_i (the default "
            f"of torch losses), 'sum' for sum_i l_i"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"{_FN}: scaler must be a torch.amp.GradScaler or None, got "
            f"{type(scaler).__name__}. Pass the scaler whose scale(loss) you call backward on"
        )
    return stats


def _batch_norm_error(name: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"{_FN}: model has module {name or '(the model)'!r} ({type(module).__name__}) using batch "
        f"statistics (training mode or track_running_stats=False), which couples the samples: "
        f"per-sample gradients do not exist. Fixes: put it in eval mode (module.eval()), "
        f"replace it by GroupNorm or LayerNorm, or call per_sample_grads on a function you "
        f"define (each sample its own batch)"
    )


def _uses_batch_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


class PerSampleGradients(HookContext):
    """Per-sample gradient statistics of ``model`` from one ordinary forward and backward.

    With a loss that is the mean (or the sum) of per-sample losses ``l_i`` over a batch of
    ``B`` samples, ``g_i`` is the gradient of ``l_i`` (no ``1/B``) w.r.t. the trainable
    parameters of ``model``. Inside the context run one forward and one backward as usual
    (``.grad`` is exactly as without the context); the statistics are read afterwards:

    * :attr:`norm` ``(B,)``: ``||g_i||`` over every trainable parameter; :attr:`norm_by_param`
      ``{name: (B,)}`` (always computed);
    * :attr:`grad` ``{name: (B, *p.shape)}`` (``stats`` has ``"grad"``);
    * :attr:`sum_sq` ``{name: p.shape}``: ``sum_i g_i**2`` (``"sum_sq"``);
    * :attr:`variance` ``{name: p.shape}``: ``(1/B) sum_i (g_i - mean_i g_i)**2``
      (``"variance"``);
    * :meth:`dot` ``(B,)``: ``g_i . v`` for a ``{name: tensor}`` dict ``v`` (``"dot"``), and
      :meth:`dot_by_param` ``{name: (B,)}`` its terms;
    * :attr:`dot_mean` ``(B,)``: ``g_i . m``, ``m = (1/B) sum_k g_k``, and
      :attr:`dot_mean_by_param` (``"dot_mean"``: computed during the backward, nothing kept);
    * :meth:`gather`: all of these over the global batch under ``torch.distributed`` (DDP).

    Names are those of ``model.named_parameters()`` (a tied weight appears once, summed over
    its uses). Closed forms from each layer's input and output gradient for ``Linear``
    (any leading dimensions), ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Embedding``,
    ``LayerNorm``, ``GroupNorm`` and ``RMSNorm``; norms without materialising per-sample
    gradients where cheaper (``||a_i||^2 ||d_i||^2``, and ``sum_tt' (a_t.a_t')(d_t.d_t')`` over
    sequences when ``2T^2 < d_in d_out``); any other module with parameters (an LSTM,
    ``MultiheadAttention``, your own) by ``torch.func`` on that module alone. Costs: the norms
    step is a forward and backward plus ``O(B d_in d_out)`` per linear layer (``O(B T^2
    (d_in + d_out))`` for sequences); ``"grad"`` stores ``B x P``; see the ``per_sample``
    benchmark suite.

    With ``"dot"`` the layers' inputs and output gradients are kept after the context exits,
    until :meth:`close`, so that ``v`` may be something computed afterwards (the optimizer's
    update). Without it nothing of the step is kept after exit. AMP: with ``scaler=`` the
    statistics are of the unscaled gradients; half-precision inputs are computed in float32.

    Samples must be independent: BatchNorm using batch statistics is refused, and the loss must
    be a per-sample mean or sum as ``loss_reduction`` says (not checked: a wrong setting scales
    every statistic by ``B``). The batch is dimension 0 of every module's input
    (``batch_first=False`` LSTMs and attention: dimension 1). Run the forward and one backward
    pass inside the context (activation checkpointing is not supported). A second backward pass
    through the same graph, as a gradient penalty makes (``autograd.grad(..., create_graph=True)``
    then ``backward()``: WGAN-GP, R1), reaches the parameters through the first pass's graph,
    where no layer rule sees it: the statistics are refused at the first read, with the reason.

    Args:
        model: the model; every trainable parameter gets statistics.
        stats: which statistics, from ``"norm"``, ``"grad"``, ``"sum_sq"``, ``"variance"``,
            ``"dot"``, ``"dot_mean"`` (norms are always computed).
        loss_reduction: ``"mean"`` (loss ``(1/B) sum_i l_i``) or ``"sum"``.
        scaler: the ``torch.amp.GradScaler`` whose scaled loss is backpropagated, if any.

    Raises:
        TypeError: ``model`` is not a module, ``stats`` is a string, ``scaler`` not a scaler.
        ValueError: unknown ``stats`` or ``loss_reduction``; BatchNorm with batch statistics;
            modules seeing different batch sizes; dropout inside a module replayed by the
            fallback.
        GradlabError: a statistic read before a backward pass, not asked for in ``stats``, or
            after a second backward pass through the step's graph.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gradlab.per_sample import PerSampleGradients
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> with PerSampleGradients(model, stats=("norm", "variance")) as ps:
        ...     nn.functional.cross_entropy(model(x), y).backward()
        >>> ps.norm.shape, ps.variance["0.weight"].shape
        (torch.Size([5]), torch.Size([8, 4]))
        >>> clip = (1.0 / ps.norm).clamp(max=1.0)  # per-sample clipping factors (DP-SGD)
        >>> clip.shape
        torch.Size([5])
    """

    _name = _FN

    def __init__(
        self,
        model: nn.Module,
        *,
        stats: Iterable[str] = ("norm",),
        loss_reduction: str = "mean",
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__()
        stats = _check_args(model, stats, loss_reduction, scaler)
        self._stats = frozenset(stats) | {"norm"}
        self._moments = bool({"sum_sq", "variance"} & self._stats)
        self._reduction = loss_reduction
        self._scaler = scaler
        self._model = model
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._pname = {id(p): n for n, p in self._params.items()}
        self._owners: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in self._params}
        for m in model.modules():
            for ln, p in m._parameters.items():
                if p is not None and id(p) in self._pname:
                    self._owners[self._pname[id(p)]].append((m, ln))
        self._ref = weakref.ref(self)
        self._replaying = False
        self._fixed: HandleBag | None = None  # hooks kept between entries (_keep_installed)
        self._notified: frozenset[str] = frozenset()  # parameters the caller reports
        # per module: local parameter name -> model parameter name (trainable ones)
        self._local: dict[int, tuple[weakref.ref, dict[str, str]]] = {}
        self._reset()

    def _reset(self) -> None:
        self._b: int | None = None
        self._b_owner = ""
        self._calls: dict[int, int] = {}
        self._records: list[_Call] = []
        self._replays: list[Replay] = []
        self._norm_sq: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._sum_sq: dict[str, torch.Tensor] = {}
        self._variance: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}  # sum_i g_i, for gather()'s variance
        self._acc: dict[str, torch.Tensor] = {}
        self._dot_grads: dict[str, torch.Tensor] = {}
        self._dot_mean: dict[str, torch.Tensor] = {}
        self._got_grad: set[str] = set()
        self._unscaled: set[str] = set()  # parameters whose statistics _finalize scales
        self._pending: list[tuple[str, torch.Tensor]] = []  # per-sample gradients for _flush
        self._pending_bytes = 0
        self._backward = False
        self._task: int | None = None  # the autograd graph task of this step's backward pass
        self._second: str | None = None  # what a second backward pass reached (see _pass)
        self._final = False
        self._closed = False
        self._scale: float | None = None

    # -- context ----------------------------------------------------------------------------
    def _install(self) -> None:
        self._reset()
        bag = self._fixed
        if bag is None:
            self._hook_model(self._bag)
        elif not bag.has_module_hooks():  # kept installed between entries (_keep_installed)
            try:
                self._hook_model(bag)
            except BaseException:
                bag.remove_all()
                raise

    def _hook_model(self, bag: HandleBag) -> None:
        ref = self._ref
        for name, m in self._model.named_modules():
            if _uses_batch_stats(m):
                raise _batch_norm_error(name, m)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bag.module(m.register_forward_pre_hook(_bn_hook(ref, name)))
            if not m._parameters or all(p is None for p in m._parameters.values()):
                continue
            rule = rule_for(m)
            if rule is not None:
                if not any(id(p) in self._pname for p in m._parameters.values()):
                    continue
                if rule.check is not None:
                    rule.check(m)
                hook = _forward_hook(ref, "_on_forward", name, rule)
            else:
                hook = _forward_hook(ref, "_on_forward_fallback", name, None)
            bag.module(m.register_forward_hook(hook, with_kwargs=True))
        for name, p in self._params.items():
            if name not in self._notified:
                bag.module(p.register_post_accumulate_grad_hook(_param_hook(ref, name)))

    def _keep_installed(self, notified: Iterable[str] = ()) -> None:
        """Keep the module and parameter hooks between entries (for a caller that enters this
        context every step, as GradientMonitor does): installed on the first entry, inactive
        outside the context, removed by :meth:`_uninstall`. Gradient hooks on a step's outputs
        still go at each exit. ``notified``: parameters whose gradients the caller's own hooks
        report (it calls :meth:`_on_param_grad` for them): no hook of this context's on them
        (one Python hook per parameter and step fewer)."""
        if self._fixed is None:
            self._fixed = HandleBag()
        self._notified = frozenset(notified)

    def _uninstall(self) -> None:
        """Remove the hooks kept by :meth:`_keep_installed`; safe to repeat."""
        if self._fixed is not None:
            self._fixed.remove_all()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bag.remove_all()
        self._active = False
        try:
            if exc_type is None and self._backward and self._second is None:
                self._finalize()  # (a second pass: the reads raise, not the exit)
        finally:
            self._replays = []
            self._acc = {}
            if "dot" not in self._stats or exc_type is not None:
                self.close()

    def close(self) -> None:
        """Drop what :meth:`dot` keeps (layer inputs and output gradients); safe to repeat."""
        self._records = []
        self._dot_grads = {}
        self._closed = True

    # -- recording (called from hooks) ------------------------------------------------------
    def _batch(self, owner: str, b: int) -> int:
        if self._b is None:
            self._b, self._b_owner = b, owner
        elif b != self._b:
            raise ValueError(
                f"{_FN}: batch sizes differ between modules: {self._b_owner or 'model'} saw "
                f"{self._b} samples on dimension 0, {owner or 'model'} saw {b}. Per-sample "
                f"statistics need every module to see the same batch on dimension 0; for a model "
                f"that reshapes the batch use per_sample_grads on a function you define"
            )
        return b

    def _check_fresh(self, owner: str) -> None:
        if self._backward:
            raise GradlabError(
                f"{_FN}: {owner or 'the model'} ran again after the backward pass; the "
                f"statistics are of one forward and one backward: open a new context per step"
            )

    def _local_names(self, module: nn.Module) -> dict[str, str]:
        hit = self._local.get(id(module))
        if hit is not None and hit[0]() is module:
            return hit[1]
        names = {
            ln: self._pname[id(p)]
            for ln, p in module._parameters.items()
            if p is not None and id(p) in self._pname
        }
        self._local[id(module)] = (weakref.ref(module), names)  # read-only for the callers
        return names

    def _on_forward(self, owner: str, rule: Rule, module: nn.Module, args: Any, kw: Any, out: Any):
        if not self._active or self._replaying or not torch.is_grad_enabled():
            return
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        self._check_fresh(owner)
        a = args[0] if args else next(iter(kw.values()))
        if a.dim() == 0:
            raise ValueError(f"{_FN}: {owner} got an input without a batch dimension")
        b = self._batch(owner, a.shape[0])
        self._calls[id(module)] = self._calls.get(id(module), 0) + 1
        call = _Call(module, owner, rule, a.detach(), self._local_names(module), b)
        self._bag.tensor(on_grad(out, self._ref, "_on_output_grad", call))

    def _on_forward_fallback(
        self, owner: str, rule: None, module: nn.Module, args: Any, kw: Any, out: Any
    ):
        if not self._active or self._replaying or not torch.is_grad_enabled():
            return
        flat_out, _ = tree_flatten(out)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat_out):
            return
        self._check_fresh(owner)
        drop = dropout_in(module)
        if drop is not None:
            raise ValueError(
                f"{_FN}: {owner} ({type(module).__name__}) has no closed form and is replayed by "
                f"torch.func, but it has active dropout ({drop}) whose masks a replay cannot "
                f"reproduce. Set its dropout to 0 or put it in eval mode"
            )
        rep = Replay(module, owner, tuple(args), dict(kw), out)
        self._batch(owner, rep.b)
        self._calls[id(module)] = self._calls.get(id(module), 0) + 1
        self._replays.append(rep)
        for k, t in enumerate(flat_out):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                self._bag.tensor(on_grad(t, self._ref, "_on_replay_grad", rep, k))

    def _pass(self, what: str) -> bool:
        """A gradient hook fired (``what`` it reached); False when this is a second backward
        pass through the step's graph, which is recorded (:meth:`_finalize` then refuses).

        A second pass is a new autograd graph task: ``autograd.grad(..., create_graph=True)``
        then ``backward()`` (a gradient penalty: WGAN-GP, R1, path length), or two backward
        calls. Its gradients w.r.t. the parameters flow through the first pass's graph too,
        where no module output gradient shows them: no per-sample rule can see them.
        """
        self._backward = True
        task = _task_id()
        if self._task is None:
            self._task = task
        elif task != self._task and self._second is None:
            self._second = what
        return self._second is None

    def _on_replay_grad(self, rep: Replay, k: int, g: torch.Tensor) -> None:
        if self._pass(rep.owner or "the model"):
            rep.receive(k, g)

    def _on_param_grad(self, name: str) -> None:
        """Parameter ``name`` received a gradient in this backward (a hook's call)."""
        if not self._active:
            return
        self._pass(f"parameter {name!r}")
        self._got_grad.add(name)

    def _factor(self, b: int) -> float:
        if self._scale is None:
            s = self._scaler
            self._scale = float(s.get_scale()) if s is not None and s.is_enabled() else 1.0
        return (b if self._reduction == "mean" else 1.0) / self._scale

    def _on_output_grad(self, call: _Call, d: torch.Tensor) -> None:
        if not self._pass(call.owner or "the model"):
            return
        if call.a is None:  # its output gradient again, in the same graph task
            self._second = call.owner or "the model"
            return
        if torch.is_grad_enabled():  # a double backward's hooks run with grad mode on
            with torch.no_grad():
                self._output_grad(call, d)
        else:  # an ordinary backward's run with it off: no context to enter (a hot path)
            self._output_grad(call, d)

    def _output_grad(self, call: _Call, d: torch.Tensor) -> None:
        a = call.a
        assert a is not None
        if d.requires_grad:  # a double backward's
            d = d.detach()
        if d.dtype in _LOW:
            d = d.float()
        if a.is_floating_point() and a.dtype != d.dtype:
            a = a.to(d.dtype)
        names = tuple(call.names)
        single = self._calls[id(call.module)] == 1 and all(
            len(self._owners[n]) == 1 for n in call.names.values()
        )
        # Every rule is linear in d, so each result is that of g_i times a power of f (the
        # same f for every call of the step): the smallest of d, the per-sample gradients
        # formed or what the call stores is scaled. A call of its own (single) stores
        # statistics unscaled where they are smaller than d (a convolution's: B numbers and
        # a weight's worth against an activation), scaled all at once in _finalize.
        f = self._factor(call.b)
        if "dot" in self._stats:  # unscaled: dot() scales its results
            call.a, call.d = a, d
            self._records.append(call)
        else:
            call.a = None
        if single:
            if f != 1.0:
                if self._stored_numel(call) < d.numel():
                    self._unscaled.update(call.names.values())
                else:
                    d = d * f
            self._single(call, a, d, names)
            return
        if f != 1.0 and self._grad_numel(call) < d.numel():
            for ln, g in call.rule.grad(call.module, a, d, names).items():
                self._add(call.names[ln], g * f)
            return
        if f != 1.0:
            d = d * f
        for ln, g in call.rule.grad(call.module, a, d, names).items():
            self._add(call.names[ln], g)

    def _stored_numel(self, call: _Call) -> int:
        """How many numbers the statistics of a call of its own hold (:meth:`_single`):
        ``B`` per parameter for the norms and for ``"dot_mean"``, the parameter's size for
        ``"sum_sq"`` (thrice with ``"variance"``), ``B`` times it for ``"grad"``."""
        stats, b = self._stats, call.b
        per_b = 2 if "dot_mean" in stats else 1
        per_p = 3 if "variance" in stats else 1 if "sum_sq" in stats else 0
        count, numel = _sizes(call)
        return b * per_b * count + per_p * numel + (b * numel if "grad" in stats else 0)

    @staticmethod
    def _grad_numel(call: _Call) -> int:
        """How many numbers the call's per-sample gradients hold: ``B`` times its parameters'."""
        return call.b * _sizes(call)[1]

    def _single(self, call: _Call, a: torch.Tensor, d: torch.Tensor, names: tuple[str, ...]):
        """Statistics of parameters used by this call alone: from the rule's closed forms
        (ghost norms, moments, dots with the mean) where it has them; where one of the asked
        statistics has none, every statistic from the per-sample gradients, formed once."""
        rule, m = call.rule, call.module
        form = "grad" in self._stats
        moments = dots = None
        if self._moments and not form:
            if rule.moments is not None:
                moments = rule.moments(m, a, d, names, "variance" in self._stats)
            form = moments is None
        if "dot_mean" in self._stats and not form:
            if rule.dot_mean is not None:
                dots = rule.dot_mean(m, a, d, names)
            form = dots is None
        if form:
            for ln, g in rule.grad(m, a, d, names).items():
                self._finish(call.names[ln], g)
            return
        if rule.norm_sq is not None:
            for ln, ns in rule.norm_sq(m, a, d, names).items():
                self._norm_sq[call.names[ln]] = ns
        else:
            for ln, g in rule.grad(m, a, d, names).items():
                self._finish(call.names[ln], g, norm_only=True)
        for ln, (total, sq) in (moments or {}).items():
            self._set_moments(call.names[ln], total, sq, call.b)
        for ln, dm in (dots or {}).items():
            self._dot_mean[call.names[ln]] = dm

    def _add(self, name: str, g: torch.Tensor) -> None:
        prev = self._acc.get(name)
        self._acc[name] = g if prev is None else prev + g

    def _set_moments(self, name: str, s: torch.Tensor | None, sq: torch.Tensor, b: int) -> None:
        self._sum_sq[name] = sq
        if s is not None:
            self._sum[name] = s
            self._variance[name] = (sq / b - (s / b).square()).clamp_min(0)

    def _finish(self, name: str, g: torch.Tensor, *, norm_only: bool = False):
        """The statistics of one parameter from its per-sample gradients ``(B, *shape)``
        (``norm_only``: the norms, and the gradients if kept). The norms of kept gradients are
        taken when read (:meth:`_norms_sq`): a step that only wants ``ps.grad`` never pays.
        Otherwise the gradients wait (up to :data:`_PENDING_BYTES`) to be reduced with those of
        other parameters of their size (:meth:`_flush`): a few operations per step rather than
        six per parameter."""
        keep = "grad" in self._stats
        if keep:
            self._grad[name] = g
        if norm_only or (keep and not self._moments and "dot_mean" not in self._stats):
            if not keep:
                self._norm_sq[name] = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
            return
        self._pending.append((name, g))
        self._pending_bytes += g.numel() * g.element_size()
        if self._pending_bytes > _PENDING_BYTES:
            self._flush()

    def _flush(self) -> None:
        """The statistics of the waiting per-sample gradients (:meth:`_finish`): those of one
        shape, dtype and device stacked ``(k, B, P)`` and reduced together."""
        if not self._pending:
            return
        # unscaled ones (calls of their own, _output_grad) are scaled here, on the reduced
        # results, unless the gradients are kept as well (then _scale_unscaled does it all)
        keep = "grad" in self._stats
        unscaled = self._unscaled
        groups: dict[tuple[Any, ...], list[tuple[str, torch.Tensor]]] = {}
        for name, g in self._pending:
            key = (g.shape, g.dtype, g.device, not keep and name in unscaled)
            groups.setdefault(key, []).append((name, g))
        self._pending = []
        self._pending_bytes = 0
        for (shape, _, _, scale), items in groups.items():
            names = [n for n, _ in items]
            k, b = len(items), shape[0]
            f = self._factor(b) if scale else 1.0
            f2 = f * f
            stacked = items[0][1][None] if k == 1 else torch.stack([g for _, g in items])
            x = stacked.reshape(k, b, -1)
            # squares kept only where sum_sq needs them (as _finish did): no temporary of a
            # large parameter's per-sample gradients for its norms or dot products
            sq = x.square() if self._moments else None
            if not keep:  # else taken from the kept gradients when read
                ns = torch.linalg.vector_norm(x, dim=2).square_() if sq is None else sq.sum(2)
                self._norm_sq.update(zip(names, _times(ns, f2).unbind(0)))
            if sq is not None:
                sum_sq = _times(sq.sum(1), f2).view(k, *shape[1:])
                self._sum_sq.update(zip(names, sum_sq.unbind(0)))
                if "variance" in self._stats:  # the sum: for gather()'s variance
                    sums = _times(x.sum(1), f).view(k, *shape[1:])
                    var = _times(x.var(1, unbiased=False), f2).view(k, *shape[1:])
                    self._sum.update(zip(names, sums.unbind(0)))
                    self._variance.update(zip(names, var.unbind(0)))
            if "dot_mean" in self._stats:
                mean = _times(x.mean(1, keepdim=True), f2)  # (k, 1, P)
                if k == 1:  # no temporary (a group of several is within _PENDING_BYTES)
                    dots = (x[0] @ mean[0, 0])[None]
                else:  # a product and a sum: bmm with one column is ~5x slower on CPU
                    dots = (x * mean).sum(2)  # (k, B)
                self._dot_mean.update(zip(names, dots.unbind(0)))
            if scale:
                unscaled.difference_update(names)

    # -- finishing ----------------------------------------------------------------------------
    def _fallback_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters a fallback replay of ``module`` differentiates: its own and
        those of descendants never called (``MultiheadAttention.out_proj`` is used directly)."""
        out = {}
        for prefix, m in module.named_modules():
            if m is not module and self._calls.get(id(m), 0):
                continue
            for ln, p in m._parameters.items():
                if p is None or id(p) not in self._pname:
                    continue
                name = self._pname[id(p)]
                if m is not module and any(
                    self._calls.get(id(o), 0) for o, _ in self._owners[name]
                ):
                    continue
                out[f"{prefix}.{ln}" if prefix else ln] = p
        return out

    def _finalize(self) -> None:
        if self._final:
            return
        if self._second is not None:
            raise GradlabError(
                f"{_FN}: a second backward pass ran through the step's graph (it reached "
                f"{self._second}): typically autograd.grad(..., create_graph=True) and then "
                f"backward(), as a gradient penalty (WGAN-GP, R1, path length) does. Per-sample "
                f"statistics are of one backward pass of a per-sample loss; a penalty's "
                f"gradient reaches the parameters through the first pass's graph, where no "
                f"layer rule sees it. Run the penalty's forward and backward outside the "
                f"context, or use per_sample_grads on a function that includes the penalty"
            )
        if not self._backward:
            raise GradlabError(
                f"{_FN}: no backward pass has run inside the context yet; run the forward and "
                f"loss.backward() inside `with PerSampleGradients(...)`, then read the statistics"
            )
        self._replaying = True
        REPLAY.depth += 1
        try:
            with torch.no_grad():
                for rep in self._replays:
                    params = self._fallback_params(rep.module)
                    if not params or not rep.grads:
                        continue
                    f = self._factor(rep.b)
                    for ln, g in replay_grads(rep, params).items():
                        name = self._pname[id(params[ln])]
                        g = g * f
                        self._add(name, g)
                        if "dot" in self._stats:
                            prev = self._dot_grads.get(name)
                            self._dot_grads[name] = g if prev is None else prev + g
                self._replays = []
                for name, g in self._acc.items():
                    self._finish(name, g)
                self._acc = {}
                self._flush()
                self._fill_unused()
                self._flush()
                if self._unscaled:
                    self._scale_unscaled()
        finally:
            self._replaying = False
            REPLAY.depth -= 1
        self._final = True

    def _scale_unscaled(self) -> None:
        """Scale the statistics that calls of their own left unscaled (:meth:`_output_grad`)
        to those of ``g_i``: by ``f`` the per-sample gradients and sums, ``f**2`` the rest.
        Out of place: a rule may return a view of its input (a normalization's bias)."""
        f = self._factor(self._b or 0)
        names = self._unscaled
        for store, power in (
            (self._norm_sq, 2),
            (self._sum_sq, 2),
            (self._variance, 2),
            (self._dot_mean, 2),
            (self._sum, 1),
            (self._grad, 1),
        ):
            keys = [n for n in names if n in store]
            if keys:
                scaled = torch._foreach_mul([store[n] for n in keys], f**power)
                store.update(zip(keys, scaled))
        self._unscaled = set()

    def _fill_unused(self) -> None:
        b = self._b if self._b is not None else 0
        for name, p in self._params.items():
            if name in self._norm_sq or name in self._grad:
                continue
            if name in self._got_grad:
                raise GradlabError(
                    f"{_FN}: parameter {name!r} received a gradient, but not through a call of a "
                    f"module that owns it (its module's forward never ran: it was used directly "
                    f"by another module's code). Call the module that owns it, or use "
                    f"per_sample_grads on a function you define"
                )
            dtype = p.dtype if p.dtype not in _LOW else torch.float32
            zeros = torch.zeros(b, *p.shape, dtype=dtype, device=p.device)
            self._finish(name, zeros)

    # -- results ------------------------------------------------------------------------------
    def _result(self, stat: str) -> None:
        if stat not in self._stats:
            raise GradlabError(
                f"{_FN}: {stat} was not computed: stats={tuple(sorted(self._stats))}. "
                f"Pass stats=(..., {stat!r}) to compute it"
            )
        self._finalize()

    @property
    def batch_size(self) -> int:
        """``B``, the number of samples of the step."""
        self._finalize()
        assert self._b is not None
        return self._b

    def _norms_sq(self) -> dict[str, torch.Tensor]:
        """``{name: (B,)}`` squared norms; those of kept per-sample gradients are taken here, on
        first read (a step that only wants ``ps.grad`` never pays for them)."""
        self._finalize()
        for name, g in self._grad.items():
            if name not in self._norm_sq:
                self._norm_sq[name] = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
        return self._norm_sq

    @property
    def norm_by_param(self) -> dict[str, torch.Tensor]:
        """``{name: (B,)}``: the per-sample gradient norm of each trainable parameter."""
        self._result("norm")
        norms_sq = self._norms_sq()
        return {n: norms_sq[n].sqrt() for n in self._params}

    @property
    def norm(self) -> torch.Tensor:
        """``(B,)``: ``||g_i||`` over every trainable parameter of the model."""
        self._result("norm")
        norms_sq = self._norms_sq()
        total = sum(norms_sq[n] for n in self._params)
        if not isinstance(total, torch.Tensor):
            return torch.zeros(self._b or 0)
        return total.sqrt()

    @property
    def grad(self) -> dict[str, torch.Tensor]:
        """``{name: (B, *p.shape)}``: the per-sample gradients (``stats`` has ``"grad"``)."""
        self._result("grad")
        return {n: self._grad[n] for n in self._params}

    @property
    def sum_sq(self) -> dict[str, torch.Tensor]:
        """``{name: p.shape}``: ``sum_i g_i**2`` (``stats`` has ``"sum_sq"``)."""
        self._result("sum_sq")
        return {n: self._sum_sq[n] for n in self._params}

    @property
    def variance(self) -> dict[str, torch.Tensor]:
        """``{name: p.shape}``: ``(1/B) sum_i (g_i - mean_i g_i)**2`` (``"variance"``)."""
        self._result("variance")
        return {n: self._variance[n] for n in self._params}

    @property
    def dot_mean_by_param(self) -> dict[str, torch.Tensor]:
        """``{name: (B,)}``: ``g_i . m`` over one parameter, ``m = (1/B) sum_k g_k`` its batch
        mean (``stats`` has ``"dot_mean"``; of this process's batch, also under DDP)."""
        self._result("dot_mean")
        return {n: self._dot_mean[n] for n in self._params}

    @property
    def dot_mean(self) -> torch.Tensor:
        """``(B,)``: ``g_i . m`` over every trainable parameter, ``m = (1/B) sum_k g_k``
        (``"dot_mean"``). Computed during the backward pass, nothing kept: Gram matrices or
        ``m`` first for linear layers, a convolution with ``m`` for convolutions."""
        by_param = self.dot_mean_by_param
        total = sum(by_param.values())
        if not isinstance(total, torch.Tensor):
            return torch.zeros(self._b or 0)
        return total

    def gather(self, group: Any = None) -> GatheredStats:
        """The statistics of the global batch under ``torch.distributed`` (DDP).

        Each rank's statistics are of its own samples; every rank calls ``gather()`` after the
        backward pass (a collective). Norms and per-sample gradients are concatenated in rank
        order (ranks may hold different numbers of samples), ``sum_sq`` summed over ranks and
        the variance computed from the global sums of ``g_i`` and ``g_i**2``: the statistics of
        one process on the union of the batches.

        Args:
            group: the process group (default: the default group).

        Returns:
            A :class:`~gradlab.per_sample.GatheredStats`.

        Raises:
            RuntimeError: no process group is initialised.
        """
        return gather(self, group)

    def dot(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)``: ``g_i . v``, summed over every trainable parameter.

        Needs ``"dot"`` in ``stats``; works after the context exits until :meth:`close`.
        Linear, convolution and embedding layers never form their per-sample gradients for
        it: ``g_i . V = sum_t d_t^T V a_t`` (a convolution: ``<d_i, conv(x_i, V)>``).

        Args:
            v: ``{name: tensor of the parameter's shape}`` for every trainable parameter
                (``dict(model.named_parameters())``'s names), e.g. ``{n: p.grad ...}`` or the
                optimizer's update.

        Raises:
            ValueError: ``v`` misses or adds names, or a tensor has the wrong shape.
            GradlabError: ``"dot"`` was not asked for, or :meth:`close` has run.
        """
        by_param = self._dots(v, "dot")
        total = sum(by_param.values())
        if not isinstance(total, torch.Tensor):
            p0 = next(iter(self._params.values()), None)
            return torch.zeros(self._b or 0, device=None if p0 is None else p0.device)
        return total

    def dot_by_param(self, v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: (B,)}``: ``g_i . v[name]`` over each trainable parameter alone (their sum
        is :meth:`dot`); the same arguments, requirements and errors as :meth:`dot`."""
        return self._dots(v, "dot_by_param")

    def _check_v(self, v: Any, fn: str) -> None:
        if not isinstance(v, Mapping):
            raise TypeError(
                f"{fn}: v must be a dict {{name: tensor}}, got {type(v).__name__}. Build it "
                f"as {{n: t for n, t in ...}} with the names of model.named_parameters()"
            )
        missing = [n for n in self._params if n not in v]
        extra = [n for n in v if n not in self._params]
        if missing or extra:
            raise ValueError(
                f"{fn}: v must have one tensor per trainable parameter; missing "
                f"{missing!r}, unknown {extra!r}. Use the names of model.named_parameters() "
                f"(trainable ones)"
            )
        for n, p in self._params.items():
            t = v[n]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{fn}: v[{n!r}] must have the parameter's shape {tuple(p.shape)}, got {got}"
                )

    def _dots(self, v: Mapping[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
        fn = f"{_FN}.{method}"
        self._result("dot")
        if self._closed:
            raise GradlabError(
                f"{fn}: close() has run, which drops what it needs; call {method} before close()"
            )
        self._check_v(v, fn)
        b = self._b or 0
        out: dict[str, torch.Tensor] = {}

        def add(name: str, part: torch.Tensor) -> None:
            prev = out.get(name)
            out[name] = part if prev is None else prev + part

        with torch.no_grad():
            f = self._factor(b)  # the records hold the output gradients as they came
            for call in self._records:
                a, d = call.a, call.d
                assert a is not None and d is not None
                for ln, n in call.names.items():
                    vv = {ln: v[n].detach()}
                    if call.rule.dot is not None:
                        add(n, call.rule.dot(call.module, a, d, vv) * f)
                    else:
                        g = call.rule.grad(call.module, a, d, (ln,))[ln]
                        add(n, (g * vv[ln].to(g.dtype)).flatten(1).sum(1) * f)
            for n, g in self._dot_grads.items():
                add(n, (g * v[n].detach().to(g.dtype)).flatten(1).sum(1))
            for n, p in self._params.items():
                if n not in out:
                    dtype = p.dtype if p.dtype not in _LOW else torch.float32
                    out[n] = torch.zeros(b, dtype=dtype, device=p.device)
        return {n: out[n] for n in self._params}


def _sizes(call: _Call) -> tuple[int, int]:
    """How many trainable parameters a call's module has, and their number of entries."""
    params = [call.module._parameters[ln] for ln in call.names]
    sizes = [p.numel() for p in params if p is not None]
    return len(sizes), sum(sizes)


def _times(t: torch.Tensor, f: float) -> torch.Tensor:
    """``t * f`` in place (``t`` is a fresh result); ``t`` itself for ``f == 1``."""
    return t if f == 1.0 else t.mul_(f)


def _forward_hook(ref: weakref.ref, method: str, owner: str, rule: Rule | None):
    def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        obj = ref()
        if obj is not None:
            getattr(obj, method)(owner, rule, module, args, kwargs, out)

    return hook


def _param_hook(ref: weakref.ref, name: str):
    def hook(p: torch.Tensor) -> None:
        obj = ref()
        if obj is not None:
            obj._on_param_grad(name)

    return hook


def _bn_hook(ref: weakref.ref, name: str):
    def hook(module: nn.Module, args: Any) -> None:
        obj = ref()
        if obj is None or not obj._active:
            return
        if _uses_batch_stats(module) and torch.is_grad_enabled():
            raise _batch_norm_error(name, module)

    return hook
