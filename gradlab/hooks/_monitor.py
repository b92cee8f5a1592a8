"""GradientMonitor: per-layer gradient statistics for every backward pass, and NaN/Inf tracing."""

from __future__ import annotations

import dataclasses
import math
import operator
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from gradlab.hooks._engine import HookContext, PassClock, on_grad
from gradlab.hooks._records import (
    STATE_VERSION,
    Compact,
    LayerStats,
    Layout,
    NonfiniteSource,
    StepStats,
    check_state,
    records_from_state,
    records_to_state,
    step_scalars,
)
from gradlab.hooks._select import check_model, select_modules
from gradlab.hooks._stats import ROWS, CpuArena, blas_stats, stats_fused

__all__ = ["GradientMonitor", "LayerStats", "NonfiniteSource", "StepStats"]

_OUT, _IN, _PARAM = 0, 1, 2


class _Slot:
    """One hooked gradient: a module's output or input tensor, or a parameter."""

    __slots__ = ("consumers", "kind", "name", "owner", "seq")

    def __init__(self, kind: int, name: str, seq: int, owner: str = "") -> None:
        self.kind = kind
        self.name = name
        self.seq = seq
        self.owner = owner
        # Calls that take this output as input; a shared empty tuple until the first one (one
        # fewer object per hooked tensor for the garbage collector to track).
        self.consumers: tuple[tuple[str, int], ...] = ()


@dataclass
class _Pending:
    step: int
    slots: list[_Slot]
    numels: list[int]
    columns: list[int]  # record index of each column of ``stats``
    stats: torch.Tensor  # (3, R): sum of squares, L1, max |g|; on the host once ``event`` is done
    event: Any
    scale: torch.Tensor | float | None  # the scaler's loss scale (None: no scaler or disabled)


_GROUPED_DEVICES = ("cpu",)  # |g| rows reduced row-wise (CpuArena); other devices: fused foreach
_ZERO = torch.zeros((), dtype=torch.float64)  # the statistics of an empty gradient
_CPU_BUFFER_BYTES = 4 * 2**20  # default buffer_bytes on CPU
_PRUNE_ABOVE = 128  # entries: dead hook handles / producer entries pruned when a pass ends
# Larger CPU gradients are reduced alone in their hook, while they are in cache: four ops cost
# less than writing |g| to a row and reading the row three times later. Measured in a training
# step: the 512 KiB gradients of the hooks suite's CNN, 1.42x -> 1.30x; the MLP's 64/256 KiB
# ones, no difference either way.
_CPU_ALONE_BYTES = 2**16
_DEVICE_BUFFER_BYTES = 64 * 2**20  # default buffer_bytes on GPUs
# Default history_size: 1000 steps is ~0.7 MB on a small model (~740 B per step) and ~16 MB with
# 500 recorded gradients; enough for a grad-flow heat map, bounded over a million-step run.
HISTORY_SIZE = 1000


class GradientMonitor(HookContext):
    r"""Record per-layer gradient statistics for every backward pass and trace NaN/Inf sources.

    A context manager; wrap one step or a whole training run. Each backward pass (one
    ``backward()`` or ``autograd.grad()`` run that reaches a monitored module; a double backward
    is two; reentrant checkpointing adds one per checkpointed segment) is one step in
    :attr:`history` with, per module, the L2 norm, max and mean absolute value of the gradient
    w.r.t. its output, and the same for every parameter's ``.grad`` after the pass.

    How it stays cheap: one forward hook per module puts tensor hooks on its outputs (and, for NaN
    tracing, on inputs that no other monitored module produced: in a chain a module's input gradient
    is its producer's output gradient and is not hooked twice). Inputs are hooked after the call,
    except for modules that may overwrite them, i.e. with an ``inplace=True`` attribute
    (``nn.ReLU(inplace=True)``, ``nn.Dropout(inplace=True)``, ...), which get a forward pre-hook as
    well; a custom module that modifies its input in place without such an attribute has the
    gradient of the modified input recorded as its input gradient. Each gradient gives three
    numbers, its sum of squares, sum and maximum of absolute values (the maximum doubles as the
    NaN/Inf detector). On CUDA the tensor hooks only keep a reference to the gradient and the
    reductions run fused (``torch._foreach_norm``, three launches) when the pass ends or the
    buffered gradients exceed ``buffer_bytes``. On CPU, where SciPy is installed (the ``fast``
    extra), the hook computes the three numbers of a float32/float64 gradient right away with
    three BLAS level-1 calls (``dot``, ``asum``, ``iamax``: read-only, while the gradient is in
    cache; the overhead is measured by the ``hooks`` benchmark suite). Without
    SciPy (and for float16/bfloat16 or non-contiguous gradients) the hook writes ``|g|`` into a
    row of a buffer kept for gradients of that size (one op, while the gradient is still in
    cache, no reference kept; gradients under 4096 entries are referenced and copied in one op
    later), and the rows of each size are reduced together (three ops per size) when the pass
    ends or the rows exceed ``buffer_bytes``; a gradient larger than 64 KiB (or than
    ``buffer_bytes``) is reduced on its own in its hook, while it is in cache (four ops: cheaper
    than a row for large ones). The row buffers are kept between passes (at most about twice
    ``buffer_bytes``), so each step writes into the same memory. The statistics of a pass are
    stacked into one tensor that stays on the device, is copied to pinned host memory without
    blocking, and is read when you access :attr:`history` / :attr:`first_nonfinite` or leave
    the context: at most one synchronisation per step, none during backward.

    **NaN/Inf tracing.** With ``trace_nonfinite=True`` (default) the monitor names the
    *source*: the first module in backward order whose backward turned finite gradients into
    non-finite ones, i.e. whose output gradient (for that call) was finite while its input
    gradient, or its parameters' gradient, was not. Modules after it in backward order, where
    the NaN merely shows up, are not blamed. If the gradient already arrives non-finite at the
    last monitored module (a NaN made by the loss), the source is reported with
    ``origin="incoming"`` at that module. NaNs produced in the *forward* pass show up as
    non-finite parameter gradients of the module that consumed them.

    **Flags.** A module or parameter is *vanishing* when its gradient's L2 norm is below
    ``vanishing`` (default ``1e-7``) and *exploding* when it is above ``exploding`` (default
    ``1e3``); both are keyword arguments, compared per step.

    **Mixed precision.** With ``scaler=`` (a ``torch.amp.GradScaler``) every statistic is of the
    unscaled gradient: divided by the loss scale in force during that backward pass (read from the
    scaler without synchronising; ``StepStats.scale``), so norms and the vanishing/exploding
    flags mean what they mean in float32. A step whose gradients hold a NaN/Inf is one
    ``GradScaler.step`` skips (it skips exactly then) and is marked ``skipped=True``, with no
    source named and :attr:`first_nonfinite` left alone: overflows of the scaled loss are
    expected while the scale is calibrated. A NaN that every step makes (a real bug) shows as
    every step skipped and a scale falling towards zero; trace it with a run without the scaler.

    **Checkpoints and loggers.** :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    history, the step count, the NaN record and the thresholds (plain containers and tensors:
    ``torch.save`` and ``torch.load(weights_only=True)``, pickle and deepcopy all work), so a
    resumed run counts on. The monitor itself cannot be pickled or copied (it hooks a live
    model). :meth:`scalars` gives a step as a flat ``{"grad/output/fc1/norm": ...}`` dict for
    TensorBoard's ``add_scalar``, ``wandb.log`` or Lightning's ``log_dict``.

    **DistributedDataParallel.** Wrap the DDP model (or its ``.module``): on each rank the monitor
    sees that rank's *local* gradients, those of the rank's own batch, before the all-reduce:
    output gradients always are, and parameter statistics are taken when backward accumulates
    the local gradient into ``.grad`` (a post-accumulate-grad hook), before DDP writes the
    averaged gradient there when backward finishes. So ranks report different numbers, and a
    NaN is traced to the rank and layer that made it. For the averaged gradients (what the
    optimizer uses) read ``.grad`` after backward, e.g. :func:`grad_flow_table` of the model.

    Every hook is removed in ``__exit__`` (exceptions included). The monitor keeps no reference
    to the model, and gradients only until the end of the pass that produced them.

    Args:
        model: the network.
        *patterns: module-name globs selecting the modules to monitor (see
            :func:`capture_grads`); none selects every leaf module.
        params: also record parameter gradients (post-accumulate-grad hooks; default True).
        trace_nonfinite: hook module inputs to name the source of NaN/Inf (default True).
        vanishing: L2-norm threshold below which a gradient is flagged as vanishing.
        exploding: L2-norm threshold above which a gradient is flagged as exploding.
        buffer_bytes: gradient bytes buffered before a reduction runs: the extra memory the
            monitor holds during backward (default: 4 MiB on CPU, where the row buffers stay
            allocated between passes; 64 MiB on GPUs).
        history_size: keep the statistics of the last ``history_size`` steps in
            :attr:`history` (default 1000; ``None`` keeps every step). A step costs about 32
            bytes per recorded gradient (module outputs, traced inputs, parameters) plus 200, so
            the default bounds the history at ~0.7 MB for a small MLP and ~16 MB for a model with
            500 recorded gradients, however long the run; log :meth:`scalars` each step for a
            full record. :attr:`steps` and :attr:`first_nonfinite` are kept regardless.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any: statistics are of the
            unscaled gradients (see above).

    Raises:
        TypeError: ``model`` is not a module, a pattern is not a string, or ``scaler`` is not a
            ``GradScaler``.
        ValueError: a pattern matches no module, a threshold is not positive / ordered, or
            ``history_size`` is not a positive int.

    Example:
        >>> from torch import nn
        >>> from gradlab.hooks import GradientMonitor
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> with GradientMonitor(net) as monitor:
        ...     for _ in range(3):
        ...         net(torch.randn(16, 4)).pow(2).mean().backward()
        >>> len(monitor.history), sorted(monitor.history[-1].outputs)
        (3, ['0', '1', '2'])
        >>> round(monitor.history[0].params["2.bias"].norm, 4), monitor.first_nonfinite
        (0.2144, None)
    """

    _name = "GradientMonitor"

    def __init__(
        self,
        model: nn.Module,
        *patterns: str,
        params: bool = True,
        trace_nonfinite: bool = True,
        vanishing: float = 1e-7,
        exploding: float = 1e3,
        buffer_bytes: int | None = None,
        history_size: int | None = HISTORY_SIZE,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__()
        check_model("GradientMonitor", model)
        if not (vanishing >= 0 and exploding > 0 and vanishing < exploding):
            raise ValueError(
                f"GradientMonitor: need 0 <= vanishing < exploding, received "
                f"vanishing={vanishing!r}, exploding={exploding!r}; e.g. vanishing=1e-7, "
                "exploding=1e3"
            )
        if buffer_bytes is not None and buffer_bytes < 0:
            raise ValueError(
                f"GradientMonitor: buffer_bytes must be >= 0, received {buffer_bytes!r}"
            )
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(
                f"GradientMonitor: history_size must be a positive int or None (keep every "
                f"step), received {history_size!r}"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"GradientMonitor: scaler must be a torch.amp.GradScaler or None, received "
                f"{type(scaler).__name__}; pass the scaler whose scale(loss) you call backward on"
            )
        self.history_size = history_size
        self.scaler = scaler
        self.vanishing = float(vanishing)
        self.exploding = float(exploding)
        self.trace_nonfinite = trace_nonfinite
        self.buffer_bytes = buffer_bytes
        modules = select_modules("GradientMonitor", model, patterns)
        chosen = _select_params(model, modules, patterns) if params else []
        # Held weakly: the monitor must not keep the model (or its layers) alive.
        self._modules = [(n, weakref.ref(m)) for n, m in modules]
        self._params = [(n, owner, weakref.ref(p)) for n, owner, p in chosen]
        names = [n for n, _ in self._modules] + [n for n, _, _ in self._params]
        self._order = {n: i for i, n in enumerate(names)}  # forward (registration) order
        self._ref = weakref.ref(self)
        self._clock = PassClock(on_start=self._start_pass, on_end=self._end_pass)
        self._seq = 0
        self._open_calls: dict[str, list[int]] = {}
        self._produced: dict[int, tuple[Any, int, _Slot]] = {}
        # the pass in progress
        self._buf: list[torch.Tensor] = []
        self._buf_idx: list[int] = []  # record index of each buffered gradient
        self._buf_bytes = 0
        self._eager: list[torch.Tensor] = []  # ROWS 0-dim statistics per CPU gradient done alone
        self._eager_idx: list[int] = []  # record index of each of them
        self._host: list[float] = []  # ROWS statistics per CPU gradient done by BLAS (floats)
        self._host_idx: list[int] = []  # record index of each of them
        self._slots: list[_Slot] = []
        self._numels: list[int] = []
        self._chunks: list[torch.Tensor] = []  # (ROWS, k) statistics of the pass so far
        self._columns: list[int] = []  # record index of each of their columns
        self._arena = CpuArena()
        self._pending: list[_Pending] = []  # on their way to the host
        self._records: deque[Compact | StepStats] = deque(maxlen=history_size)
        self._layouts: dict[tuple[tuple[int, ...], tuple[str, ...]], Layout] = {}
        self._count = 0  # backward passes recorded
        self._source: NonfiniteSource | None = None
        names_set = {n for n, _ in self._modules}
        # scalars() key of the root module (a model that is itself a leaf, or matched by "*")
        self._root_key = "model" if "model" not in names_set else "model(root)"

    # -- context --------------------------------------------------------------------------
    def _install(self) -> None:
        ref = self._ref
        for name, module_ref in self._modules:
            module = self._deref(module_ref, name)
            inplace = self.trace_nonfinite and getattr(module, "inplace", False) is True
            if inplace:  # it may overwrite its input: hook the input before it runs
                pre = _pre_hook(ref, name)
                self._bag.module(module.register_forward_pre_hook(pre, with_kwargs=True))
            hook = _fwd_hook(ref, name, self.trace_nonfinite and not inplace)
            self._bag.module(module.register_forward_hook(hook, with_kwargs=True))
        for pname, owner, p_ref in self._params:
            p = self._deref(p_ref, pname)
            slot = _Slot(_PARAM, pname, 0, owner)
            self._bag.module(p.register_post_accumulate_grad_hook(_param_hook(ref, slot)))

    def _after_exit(self) -> None:
        self._produced.clear()
        self._open_calls.clear()
        if self._slots:  # a pass whose end callback never ran (it raised)
            self._finish_pass()
        self._materialize()

    # -- forward side ---------------------------------------------------------------------
    def _on_inputs(self, name: str, args: Any) -> None:
        self._seq += 1
        seq = self._seq
        self._open_calls.setdefault(name, []).append(seq)
        if torch.is_grad_enabled():
            self._hook_inputs(name, seq, args)

    def _on_call(self, name: str, args: Any, output: Any) -> None:
        """Inputs and outputs of a call, seen after it (modules that do not run in place)."""
        self._seq += 1
        seq = self._seq
        if torch.is_grad_enabled():
            self._hook_inputs(name, seq, args)
            self._hook_outputs(name, seq, output)

    def _hook_inputs(self, name: str, seq: int, args: Any) -> None:
        a0 = args[0] if len(args) == 1 else None
        flat = [a0] if isinstance(a0, torch.Tensor) else tree_flatten(args)[0]
        for t in flat:
            if not (isinstance(t, torch.Tensor) and t.requires_grad):
                continue
            hit = self._produced.get(id(t))
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                hit[2].consumers += ((name, seq),)  # same gradient as that output: reuse it
            else:
                self._bag.tensor(on_grad(t, self._ref, "_add", _Slot(_IN, name, seq)))

    def _on_outputs(self, name: str, output: Any) -> None:
        stack = self._open_calls.get(name)
        if stack:
            seq = stack.pop()
        else:
            self._seq += 1
            seq = self._seq
        if torch.is_grad_enabled():
            self._hook_outputs(name, seq, output)

    def _hook_outputs(self, name: str, seq: int, output: Any) -> None:
        outs = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
        for t in outs:
            if not (isinstance(t, torch.Tensor) and t.requires_grad):
                continue
            slot = _Slot(_OUT, name, seq)
            self._bag.tensor(on_grad(t, self._ref, "_add", slot))
            if self.trace_nonfinite:
                self._produced[id(t)] = (weakref.ref(t), t._version, slot)
                if len(self._produced) > 4096:  # forwards without backward: drop dead entries
                    self._prune_produced()

    # -- backward side --------------------------------------------------------------------
    def _add(self, slot: _Slot, grad: torch.Tensor) -> None:
        self._clock.touch()
        g = grad.detach() if grad.requires_grad else grad
        index = len(self._slots)
        self._slots.append(slot)
        n = g.numel()
        self._numels.append(n)
        limit = self.buffer_bytes
        if g.device.type in _GROUPED_DEVICES:
            host = blas_stats(g)
            if host is not None:  # three BLAS reads while g is in cache, no torch op
                self._host += host
                self._host_idx.append(index)
                return
            if limit is None:
                limit = _CPU_BUFFER_BYTES
            nbytes = n * g.element_size()
            if n and nbytes <= limit and nbytes <= _CPU_ALONE_BYTES:
                # |g| into a row of a warm buffer now, while g is in cache; reduced with the
                # other gradients of its size when the pass ends or the rows exceed the limit.
                self._arena.add(g, index)
                if self._arena.bytes > limit:
                    self._flush()
                return
            self._eager += self._arena.one(g) if n else [_ZERO] * ROWS
            self._eager_idx.append(index)
            return
        self._buf.append(g)
        self._buf_idx.append(index)
        self._buf_bytes += n * g.element_size()
        if self._buf_bytes > (_DEVICE_BUFFER_BYTES if limit is None else limit):
            self._flush()

    def _flush(self) -> None:
        if self._arena.bytes:
            with torch.no_grad():
                chunks, order = self._arena.flush()
            self._chunks.extend(chunks)
            self._columns.extend(order)
        buf = self._buf
        if not buf:
            return
        with torch.no_grad():
            self._chunks.append(torch.stack([torch.stack(c) for c in stats_fused(buf)]))
        self._columns.extend(self._buf_idx)
        self._buf = []
        self._buf_idx = []
        self._buf_bytes = 0

    def _start_pass(self) -> None:
        if self._slots:  # the previous pass raised before its end callback
            self._finish_pass()
        if len(self._pending) >= 64:
            self._materialize(only_ready=True)

    def _end_pass(self) -> None:
        self._finish_pass()
        # The handles and producer entries of a finished pass's graph are dead weight, but
        # pruning them costs a few microseconds per entry: only once they add up.
        self._bag.prune(above=_PRUNE_ABOVE)
        if len(self._produced) > _PRUNE_ABOVE:
            self._prune_produced()

    def _prune_produced(self) -> None:
        self._produced = {k: v for k, v in self._produced.items() if v[0]() is not None}

    def _finish_pass(self) -> None:
        self._flush()
        chunks, columns = self._chunks, self._columns
        if self._eager:
            chunks.append(torch.stack(self._eager).view(-1, ROWS).t())
            columns.extend(self._eager_idx)
        if self._host:
            chunks.append(torch.tensor(self._host, dtype=torch.float64).view(-1, ROWS).t())
            columns.extend(self._host_idx)
        slots, numels = self._slots, self._numels
        self._slots, self._numels, self._chunks, self._columns = [], [], [], []
        self._eager, self._eager_idx = [], []
        self._host, self._host_idx = [], []
        if not slots:
            return
        step = self._count
        self._count += 1
        scale = self._scale_now()
        with torch.no_grad():
            device = chunks[0].device
            if any(t.device != device for t in chunks):
                chunks = [t.cpu() for t in chunks]
                device = torch.device("cpu")
            stats = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
            event = None
            if device.type == "cuda":
                # The engine may finish a pass on another thread/device: pin the copy and its
                # event to the statistics' device and that device's current stream.
                with torch.cuda.device(device):
                    host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
                    host.copy_(stats, non_blocking=True)
                    if isinstance(scale, torch.Tensor) and scale.device == device:
                        pinned = torch.empty(scale.shape, dtype=scale.dtype, pin_memory=True)
                        scale = pinned.copy_(scale, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(device))
                stats = host
            elif device.type != "cpu":
                stats = stats.cpu()
        self._pending.append(_Pending(step, slots, numels, columns, stats, event, scale))

    def _scale_now(self) -> torch.Tensor | float | None:
        """The scaler's current loss scale, without a sync (a copy: ``update()`` changes it)."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        t = getattr(scaler, "_scale", None)
        if isinstance(t, torch.Tensor):
            with torch.no_grad():
                return t.detach().clone()
        return float(scaler.get_scale())

    # -- results --------------------------------------------------------------------------
    def _materialize(self, *, only_ready: bool = False) -> None:
        """Turn steps whose statistics reached the host into records (no sync if ``only_ready``).

        A finite step is kept compact: its layout (kind and name of each record, shared by every
        step with the same structure) and one (4, R) float64 array. A step with a NaN/Inf is
        analysed at once (its source needs the calls' bookkeeping, which is then dropped).
        """
        while self._pending:
            p = self._pending[0]
            if p.event is not None:
                if only_ready and not p.event.query():
                    return
                p.event.synchronize()
            self._pending.pop(0)
            vals = np.empty((ROWS + 1, len(p.slots)))
            vals[:ROWS, p.columns] = p.stats.numpy()
            vals[ROWS] = p.numels
            scale = 1.0
            if p.scale is not None:
                scale = float(p.scale.cpu() if isinstance(p.scale, torch.Tensor) else p.scale)
                vals[0] /= scale * scale  # sum of squares
                vals[1:ROWS] /= scale  # L1, max |g|
            if np.isfinite(vals[2]).all():  # max |g|: the NaN/Inf detector
                self._records.append(Compact(p.step, self._layout(p.slots), vals, scale))
                continue
            rec = self._summarise(p.step, p.slots, vals, scale)
            if p.scale is not None:  # GradScaler.step skips it: an overflow, nobody's fault
                rec = dataclasses.replace(rec, skipped=True)
            elif self.trace_nonfinite:
                rec = dataclasses.replace(rec, source=_trace(p.step, p.slots, vals[2].tolist()))
                if self._source is None:
                    self._source = rec.source
            self._records.append(rec)

    def _layout(self, slots: list[_Slot]) -> Layout:
        key = (tuple(map(_KIND, slots)), tuple(map(_NAME, slots)))
        layout = self._layouts.get(key)
        if layout is None:
            layout = Layout(*key)
            if len(self._layouts) < _MAX_LAYOUTS:  # else a model whose structure keeps changing
                self._layouts[key] = layout
        return layout

    def _summarise(
        self, step: int, slots: Sequence[Any], vals: np.ndarray, scale: float = 1.0
    ) -> StepStats:
        """StepStats (without a source) from per-record statistics; ``slots``: .kind, .name."""
        sq, l1, linf, numel = vals.tolist()
        outs: dict[str, list[float]] = {}  # name -> [sum of squares, L1, Linf, numel]
        params: dict[str, LayerStats] = {}
        for i, s in enumerate(slots):
            if s.kind == _OUT:
                a = outs.setdefault(s.name, [0.0, 0.0, 0.0, 0.0])
                a[0] += sq[i]
                a[1] += l1[i]
                a[2] = math.nan if math.isnan(linf[i]) or math.isnan(a[2]) else max(a[2], linf[i])
                a[3] += numel[i]
            elif s.kind == _PARAM:
                params[s.name] = LayerStats(math.sqrt(sq[i]), linf[i], _mean(l1[i], numel[i]))
        order = self._order
        outputs = {
            n: LayerStats(math.sqrt(a[0]), a[2], _mean(a[1], a[3]))
            for n, a in sorted(outs.items(), key=lambda kv: order.get(kv[0], 0))
        }
        params = dict(sorted(params.items(), key=lambda kv: order.get(kv[0], 0)))
        named = list(outputs.items()) + list(params.items())
        return StepStats(
            step=step,
            outputs=outputs,
            params=params,
            vanishing=tuple(n for n, s in named if s.norm < self.vanishing),
            exploding=tuple(
                n for n, s in named if math.isfinite(s.max_abs) and s.norm > self.exploding
            ),
            nonfinite=tuple(n for n, s in named if not math.isfinite(s.max_abs)),
            source=None,
            scale=scale,
        )

    def _expand(self, rec: Compact | StepStats) -> StepStats:
        if isinstance(rec, StepStats):
            return rec
        return self._summarise(rec.step, rec.layout.slots, rec.vals, rec.scale)

    @property
    def history(self) -> Sequence[StepStats]:
        """One :class:`StepStats` per backward pass so far (reading it synchronises once).

        A read-only, live sequence (index, slice, iterate, ``len``): steps recorded later show
        up in it once they are read (any access to :attr:`history` or :attr:`first_nonfinite`).
        With ``history_size`` it holds the last ``history_size`` steps; ``StepStats.step``
        keeps counting from the first pass. A finite step is stored compactly (32 bytes per
        recorded gradient plus about 200 per step) and its :class:`StepStats` is built each
        time you read it; keep the ones you use.
        """
        self._materialize()
        return _History(self)

    @property
    def steps(self) -> int:
        """Number of backward passes recorded so far (no synchronisation)."""
        return self._count

    @property
    def nonfinite_source(self) -> NonfiniteSource | None:
        """The first NaN/Inf source seen (module, step, origin), or ``None`` while all finite."""
        self._materialize()
        return self._source

    @property
    def first_nonfinite(self) -> str | None:
        """Name of the module whose backward first turned finite gradients into NaN/Inf.

        ``None`` while every recorded gradient is finite. See :attr:`nonfinite_source` for the
        step and the origin.
        """
        src = self.nonfinite_source
        return None if src is None else src.module

    @property
    def first_nonfinite_step(self) -> int | None:
        """The step (backward-pass index) of :attr:`first_nonfinite`, or ``None``."""
        src = self.nonfinite_source
        return None if src is None else src.step

    # -- logging ---------------------------------------------------------------------------
    def scalars(self, step: int = -1) -> dict[str, float]:
        """One recorded step as a flat ``{key: float}`` dict for TensorBoard, W&B or Lightning.

        Keys are stable, slash-separated and the same every step of a run:

        * ``grad/output/<module>/norm``, ``.../max_abs``, ``.../mean_abs``: the statistics of
          the gradient w.r.t. each monitored module's output (``<module>`` is its name as in
          ``model.named_modules()``, e.g. ``grad/output/layer1.0.conv1/norm``; the root module
          is ``model``);
        * ``grad/param/<parameter>/norm``, ``.../max_abs``, ``.../mean_abs``: each parameter's
          ``.grad``;
        * ``grad/total_norm``: the L2 norm of all recorded parameter gradients together (what
          ``clip_grad_norm_`` computes), when parameters are recorded;
        * ``grad/vanishing``, ``grad/exploding``, ``grad/nonfinite``: how many gradients carry
          each flag;
        * ``grad/scale`` and ``grad/skipped`` (1.0 or 0.0) with a ``scaler``.

        TensorBoard replaces characters other than letters, digits and ``-_./`` in a tag with
        ``_``; module names from ``named_modules()`` never hold any.

        Args:
            step: index into :attr:`history` (default: the last step). The step's own number is
                ``monitor.history[step].step``.

        Raises:
            ValueError: nothing recorded yet, or ``step`` out of range.

        Example:
            >>> from torch import nn
            >>> from gradlab.hooks import GradientMonitor
            >>> torch.manual_seed(0)
            <torch._C.Generator object at ...>
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> with GradientMonitor(net) as monitor:
            ...     net(torch.randn(16, 4)).pow(2).mean().backward()
            >>> logs = monitor.scalars()
            >>> round(logs["grad/output/2/norm"], 4), round(logs["grad/param/2.bias/norm"], 4)
            (0.0878, 0.2144)
            >>> len(logs), logs["grad/nonfinite"]
            (25, 0.0)
        """
        history = self.history
        if not history:
            raise ValueError(
                "GradientMonitor.scalars: no backward pass recorded yet; call it after "
                "loss.backward() inside `with GradientMonitor(model) as monitor:`"
            )
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(
                f"GradientMonitor.scalars: step must be an int, received {type(step).__name__}"
            )
        if not -len(history) <= step < len(history):
            raise ValueError(
                f"GradientMonitor.scalars: step={step} is out of range for {len(history)} "
                f"recorded steps; use -1 (the last) or 0..{len(history) - 1}"
            )
        return step_scalars(
            history[step],
            root=self._root_key,
            total=bool(self._params),
            scaler=self.scaler is not None,
        )

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The recorded run: history, step count, NaN record and thresholds, for a checkpoint.

        Plain containers (dict, list, str, int, float, bool, None) and float64 tensors only, so
        it goes through ``torch.save`` / ``torch.load(weights_only=True)``, pickle and
        ``copy.deepcopy``; it is a snapshot (later steps do not change it). Statistics of steps
        still on their way from the GPU are read first (one synchronisation). Call it between
        steps; a backward pass in progress is not included.

        Example:
            >>> from torch import nn
            >>> from gradlab.hooks import GradientMonitor
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> with GradientMonitor(net) as monitor:
            ...     net(torch.randn(16, 4)).pow(2).mean().backward()
            >>> resumed = GradientMonitor(net)
            >>> resumed.load_state_dict(monitor.state_dict())
            >>> with resumed:
            ...     net(torch.randn(16, 4)).pow(2).mean().backward()
            >>> resumed.steps, [r.step for r in resumed.history]
            (2, [0, 1])
        """
        self._materialize()
        layouts, history = records_to_state(self._records)
        return {
            "version": STATE_VERSION,
            "steps": self._count,
            "vanishing": self.vanishing,
            "exploding": self.exploding,
            "nonfinite_source": None if self._source is None else list(self._source),
            "layouts": layouts,
            "history": history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next backward pass is step ``steps``.

        Replaces the history, the step count, the NaN record and the ``vanishing`` /
        ``exploding`` thresholds (the ones the run was recorded with). What to record
        (patterns, ``params``, ``history_size``, ``scaler``, ...) stays as this monitor was
        built: with a smaller ``history_size`` only the last steps are kept. Call it before
        entering the context or between steps. The state dict is not modified.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: it is not a GradientMonitor state dict (a key is missing or the
                version is unknown).
        """
        check_state("GradientMonitor.load_state_dict", state_dict)
        vanishing, exploding = float(state_dict["vanishing"]), float(state_dict["exploding"])
        records = records_from_state(state_dict, self.history_size)
        src = state_dict["nonfinite_source"]
        self._materialize()
        self.vanishing, self.exploding = vanishing, exploding
        self._records = records
        self._count = int(state_dict["steps"])
        self._source = None if src is None else NonfiniteSource(str(src[0]), int(src[1]), src[2])

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "GradientMonitor: a monitor cannot be pickled or copied (it hooks a live model); "
            "checkpoint monitor.state_dict() and restore it with "
            "GradientMonitor(model, ...).load_state_dict(state)"
        )

    def __repr__(self) -> str:
        src = self._source.module if self._source else None
        return (
            f"GradientMonitor({len(self._modules)} modules, {len(self._params)} parameters, "
            f"{self.steps} steps, first_nonfinite={src!r})"
        )


_KIND = operator.attrgetter("kind")
_NAME = operator.attrgetter("name")
_MAX_LAYOUTS = 256  # distinct step structures remembered (shared between steps)


class _History(Sequence[StepStats]):
    """Read-only view of a monitor's records; builds each StepStats when it is read."""

    __slots__ = ("_monitor",)

    def __init__(self, monitor: GradientMonitor) -> None:
        self._monitor = monitor

    def __len__(self) -> int:
        return len(self._monitor._records)

    @overload
    def __getitem__(self, i: int) -> StepStats: ...

    @overload
    def __getitem__(self, i: slice) -> list[StepStats]: ...

    def __getitem__(self, i: int | slice) -> StepStats | list[StepStats]:
        records = self._monitor._records
        expand = self._monitor._expand
        if isinstance(i, slice):
            return [expand(records[j]) for j in range(*i.indices(len(records)))]
        return expand(records[i])

    def __iter__(self) -> Iterator[StepStats]:
        expand = self._monitor._expand
        for rec in list(self._monitor._records):
            yield expand(rec)

    def __repr__(self) -> str:
        return f"<GradientMonitor history: {len(self)} steps>"


def _trace(step: int, slots: list[_Slot], linf: list[float]) -> NonfiniteSource | None:
    """The source of the NaN/Inf in a step: see :class:`GradientMonitor`."""
    bad_calls: set[tuple[str, int]] = set()
    bad_modules: set[str] = set()
    for s, v in zip(slots, linf):
        if s.kind == _OUT and not math.isfinite(v):
            bad_calls.add((s.name, s.seq))
            bad_modules.add(s.name)
    first_bad_out: str | None = None
    for i, s in enumerate(slots):  # backward (firing) order
        if math.isfinite(linf[i]):
            continue
        if s.kind == _PARAM:
            if s.owner not in bad_modules:
                return NonfiniteSource(s.owner, step, "backward")
            continue
        calls = [(s.name, s.seq)] if s.kind == _IN else s.consumers
        for c in calls:
            if c not in bad_calls:
                return NonfiniteSource(c[0], step, "backward")
        if s.kind == _OUT and first_bad_out is None:
            first_bad_out = s.name
    if first_bad_out is not None:
        return NonfiniteSource(first_bad_out, step, "incoming")
    return None


def _mean(total: float, n: float) -> float:
    return total / n if n else 0.0


def _pre_hook(ref: weakref.ref[GradientMonitor], name: str) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        mon = ref()
        if mon is not None:
            mon._on_inputs(name, (args, kwargs) if kwargs else args)  # args: a tuple

    return hook


def _fwd_hook(ref: weakref.ref[GradientMonitor], name: str, inputs: bool) -> Any:
    """Forward hook: hooks the outputs' gradients, and the inputs' if ``inputs``."""

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        mon = ref()
        if mon is None:
            return
        if inputs:
            mon._on_call(name, (args, kwargs) if kwargs else args, output)
        else:
            mon._on_outputs(name, output)

    return hook


def _param_hook(ref: weakref.ref[GradientMonitor], slot: _Slot) -> Any:
    def hook(p: torch.Tensor) -> None:
        mon = ref()
        if mon is not None and p.grad is not None:
            mon._add(slot, p.grad)

    return hook


def _select_params(
    model: nn.Module, modules: list[tuple[str, nn.Module]], patterns: tuple[str, ...]
) -> list[tuple[str, str, nn.Parameter]]:
    """(parameter name, owning monitored module, parameter) for the parameters to record."""
    names = sorted((n for n, _ in modules), key=len, reverse=True)
    if patterns:
        chosen: dict[int, str] = {}
        for mname, m in modules:
            prefix = f"{mname}." if mname else ""
            for pname, p in m.named_parameters():
                chosen.setdefault(id(p), prefix + pname)
        pool = [(n, p) for n, p in model.named_parameters() if id(p) in chosen]
    else:
        pool = list(model.named_parameters())
    out = []
    for pname, p in pool:
        if not p.requires_grad:
            continue
        owner = next((n for n in names if n == "" or pname.startswith(n + ".")), None)
        if owner is None:
            owner = pname.rpartition(".")[0]
        out.append((pname, owner, p))
    return out
