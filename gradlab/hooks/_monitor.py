"""GradientMonitor: per-layer gradient statistics for every backward pass, NaN/Inf tracing, and
training diagnostics.

The monitor is a small class over separate pieces, each in its own module:

* :mod:`~gradlab.hooks._trace`: which gradients to hook on the forward side, and the NaN source;
* :mod:`~gradlab.hooks._buffer`: one pass's gradients reduced to raw statistics (buffer, flush,
  copy to the host);
* :mod:`~gradlab.hooks._table`: the table of statistics (one named row each) that turns raw rows
  into :class:`LayerStats`;
* :mod:`~gradlab.hooks._diagnostics`: the table of diagnostics (one named row each, declaring its
  ingredients) and the parameter snapshots they need;
* :mod:`~gradlab.hooks._history`: compact records, read back as :class:`StepStats`;
* :mod:`~gradlab.hooks._records`: the record types, checkpoints and logger scalars.

Cost notes (internals; figures in benchmarks/RESULTS.md). One forward hook per module puts
gradient hooks on its outputs, and for tracing on inputs no other monitored module produced.
Inputs are hooked after the call, except for modules with an ``inplace=True`` attribute, which
get a forward pre-hook as well (a custom module that overwrites its input without such an
attribute has the gradient of the modified input recorded). Each gradient gives three numbers
(sum of squares, sum and max of |g|; the max doubles as the NaN/Inf detector), reduced while the
gradient is in cache on CPU, or by fused ``_foreach_norm`` launches when the pass ends on GPUs;
the step's numbers are copied to pinned host memory without blocking and read at most once per
step, never during backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gradlab._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_type,
    message,
)
from gradlab.hooks._alpha import AlphaSteps
from gradlab.hooks._buffer import PassBuffer, Pending, to_host
from gradlab.hooks._ddp import DDPNoiseRecorder, attach
from gradlab.hooks._diagnostics import ParamTracker, StepDiagnostics, check_diagnostics
from gradlab.hooks._engine import REPLAY, HookContext, PassClock
from gradlab.hooks._histograms import GradHistogram, HistogramSteps
from gradlab.hooks._history import History, HistoryView
from gradlab.hooks._losses import LOSS_DIAGNOSTICS, LossSteps, check_losses
from gradlab.hooks._persample import PER_SAMPLE, PerSampleSteps
from gradlab.hooks._records import (
    STATE_VERSION,
    LayerStats,
    NonfiniteSource,
    StepStats,
    check_state,
    records_from_state,
    records_to_state,
    step_scalars,
)
from gradlab.hooks._select import check_model, select_modules
from gradlab.hooks._tic import TicSteps
from gradlab.hooks._trace import PARAM, CallTracker, Slot

__all__ = ["GradientMonitor", "LayerStats", "NonfiniteSource", "StepStats"]

_PRUNE_ABOVE = 128  # entries: dead hook handles / producer entries pruned when a pass ends
# Default history_size: 1000 steps is ~0.7 MB on a small model (~740 B per step) and ~16 MB with
# 500 recorded gradients; enough for a grad-flow heat map, bounded over a million-step run.
HISTORY_SIZE = 1000


class GradientMonitor(HookContext):
    r"""Record per-layer gradient statistics for every backward pass and trace NaN/Inf sources.

    A context manager; wrap one step or a whole training run. Each backward pass that reaches a
    monitored module (a double backward is two; reentrant checkpointing adds one per segment) is
    one :class:`StepStats` in :attr:`history`: per module the L2 norm, max and mean absolute
    value of the gradient w.r.t. its output, the same for every parameter's ``.grad``, and the
    names flagged *vanishing* (norm below ``vanishing``), *exploding* (above ``exploding``) or
    non-finite.
    :meth:`scalars` gives a step as ``{"grad/output/fc1/norm": ...}`` for TensorBoard, W&B or
    Lightning; :meth:`state_dict` / :meth:`load_state_dict` checkpoint the run.

    **NaN/Inf source.** :attr:`first_nonfinite` names the first module in backward order whose
    backward turned finite gradients into non-finite ones (where the NaN is *made*, not every
    layer it reaches); ``origin="incoming"`` when it already arrives from the loss.

    **Diagnostics** (``diagnostics=(...)``, on steps ``0, every, 2 every, ...``), in
    ``history[i].diagnostics`` (over all monitored parameters), ``diagnostics_by_module`` and
    :meth:`scalars` (``diagnostics/<name>``, ``diagnostics/<name>/<module>``). With ``g_i`` the
    gradient of sample i's loss term (no 1/B), ``m = (1/B) sum_i g_i``,
    ``S = 1/(B-1) sum_i ||g_i - m||^2`` (from :mod:`gradlab.per_sample`; ``loss_reduction``
    says whether the loss is the mean or the sum of the terms):

    * ``noise_scale``: B_simple = ``S / (||m||^2 - S/B)`` (McCandlish et al. 2018, App. A;
      ``ema=`` smooths numerator and denominator separately);
    * ``gsnr``: mean over entries of ``m_j^2 / ((1/B) sum_i g_ij^2 - m_j^2 + eps)``, eps=1e-5;
    * ``norm_test``: ``sqrt(S / (B ||m||^2))``; ``inner_product_test``:
      ``sqrt(1/(B-1) (sum_i (g_i.m)^2 - B ||m||^4) / (B ||m||^4))``; ``orthogonality_test``:
      ``sqrt(1/(B-1) (sum_i ||g_i||^2 - sum_i (g_i.m)^2/||m||^2) / (B ||m||^2))``
      (Cockpit's NormTest, InnerTest, OrthoTest);
    * ``update_size``: ``||theta_t - theta_{t-1}||``, the actual change made by the optimizer
      step after backward t (any optimizer; take it inside the context); ``distance``:
      ``||theta_t - theta_0||`` from the first diagnostic step;
    * ``ddp_noise_scale`` (a DDP model): McCandlish's two-batch estimate from each rank's
      local gradient and the all-reduced one, recorded by a communication hook;
    * ``loss_mean``, ``loss_var``: mean and unbiased variance of the per-sample losses ``l_i``
      handed over with :meth:`record_loss`;
    * ``alpha``: the step-size quality of Mahsereci & Hennig (Cockpit's ``Alpha``) for any
      optimizer: a weighted least-squares quadratic ``c + b x + a x^2`` fitted along the
      actual update ``d = theta_{t+1} - theta_t`` to the loss mean and the mean projection
      ``g_i . d/||d||`` at step t (x = 0) and step t+1 (x = ``||d||``), weights the inverse
      per-sample variances; ``alpha = 2 ||d|| / (-b/a) - 1`` (-1: no progress, 0: the
      minimum, 1: the other side; -1 for a concave fit or a zero step). Stored on step t
      once step t+1 has run (NaN for the last step or without :meth:`record_loss`); with
      ``every > 1`` the step after each diagnostic step also runs a per-sample pass;
    * ``tic``, ``tic_trace``: the Takeuchi information criterion ``sum_j v_j / (h_j + 1e-7)``
      and ``sum_j v_j / (sum_j h_j + 1e-7)``, ``v_j = (1/B) sum_i g_ij^2``, ``h`` the exact
      Hessian diagonal of the mean loss, on the steps where :meth:`record_tic` hands over the
      loss as a function (Thomas et al. 2019; Cockpit's TICDiag, TICTrace).

    B = 1 gives NaN (S is undefined; warned once); BatchNorm in training mode is refused.

    **Cost.** A forward hook per module and a gradient hook per output (plus traced inputs and
    parameters); three reductions per gradient, done while it is in cache on CPU and fused at
    the end of the pass on GPUs; at most one synchronisation per step, when you read
    :attr:`history` or :attr:`first_nonfinite`, none during backward; about 32 bytes per
    recorded gradient and step of history. Diagnostics cost only on their steps: the
    per-sample ones a :class:`~gradlab.per_sample.PerSampleGradients` pass (norms; ``gsnr``
    adds second moments and a copy of the gradients, the two tests each sample's dot with the
    batch mean), ``update_size`` a copy of the parameters until the optimizer step,
    ``distance`` one copy for the run,
    ``ddp_noise_scale`` two norms per all-reduce bucket and a 2-number all-reduce (its
    communication hook stays on the DDP model after exit, as DDP's plain averaging);
    ``alpha`` a copy of the parameters and the per-sample pass's layer inputs and output
    gradients kept from backward t to forward t+1, and two dot products per layer; ``tic``
    a copy of the model and an exact Hessian diagonal per :meth:`record_tic` call.

    **Mixed precision, DDP.** With ``scaler=`` every statistic is of the unscaled gradient, and
    a step whose gradients overflow (``GradScaler.step`` skips it) is marked ``skipped``,
    nobody blamed. Under DistributedDataParallel each rank records its *local* gradients
    (before the all-reduce). Every hook is removed in ``__exit__``; the monitor keeps no
    reference to the model.

    Args:
        model: the network.
        *patterns: module-name globs selecting the modules to monitor (see
            :func:`capture_grads`); none selects every leaf module.
        params: also record parameter gradients (default True).
        trace_nonfinite: hook module inputs to name the source of NaN/Inf (default True).
        vanishing: L2-norm threshold below which a gradient is flagged vanishing (1e-7).
        exploding: L2-norm threshold above which a gradient is flagged exploding (1e3).
        buffer_bytes: gradient bytes buffered before a reduction runs (default 4 MiB on CPU,
            64 MiB on GPUs).
        history_size: steps kept in :attr:`history` (default 1000; ``None``: all).
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any.
        diagnostics: names of diagnostics to compute (see above).
        every: compute the diagnostics on steps ``0, every, 2 every, ...`` only (default 1).
        loss_reduction: ``"mean"`` (the loss is ``(1/B) sum_i l_i``, default) or ``"sum"``.
        ema: smoothing factor in [0, 1) of the noise scale's numerator and denominator
            (default None: none).
        histogram_bins: keep a histogram of every monitored parameter gradient's elements
            with this many bins, on steps ``0, every, ...`` (:attr:`grad_histograms`,
            written by :func:`write_tensorboard`; default None: none).

    Raises:
        TypeError: ``model`` is not a module, a pattern is not a string, ``scaler`` is not a
            ``GradScaler``, or an argument has the wrong type.
        ValueError: a pattern matches no module, the thresholds are not ``0 <= vanishing <
            exploding``, a size is not a positive int, or a diagnostic name is unknown.

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

        Diagnostics, with an optimizer step inside the context:

        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with GradientMonitor(net, diagnostics=("noise_scale", "update_size")) as monitor:
        ...     opt.zero_grad()
        ...     net(torch.randn(16, 4)).pow(2).mean().backward()
        ...     opt.step()
        >>> {k: round(v, 3) for k, v in monitor.history[0].diagnostics.items()}
        {'noise_scale': 15.069, 'update_size': 0.025}
        >>> sorted(monitor.history[0].diagnostics_by_module["update_size"])
        ['0', '2']
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
        diagnostics: Sequence[str] = (),
        every: int = 1,
        loss_reduction: str = "mean",
        ema: float | None = None,
        histogram_bins: int | None = None,
    ) -> None:
        super().__init__()
        fn = "GradientMonitor"
        vanishing, exploding = _check_args(
            fn,
            model,
            vanishing,
            exploding,
            buffer_bytes,
            history_size,
            every,
            params,
            trace_nonfinite,
            loss_reduction,
            ema,
            scaler,
        )
        self.diagnostics = check_diagnostics(fn, diagnostics)
        if histogram_bins is not None:
            check_int(fn, "histogram_bins", histogram_bins, minimum=1, fix="E.g. 64, or None: none")
        self._ddp: weakref.ref[nn.Module] | None = None
        self._recorder: DDPNoiseRecorder | None = None
        if "ddp_noise_scale" in self.diagnostics:
            if not isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError(
                    message(
                        fn,
                        "model",
                        "a DistributedDataParallel model for diagnostics 'ddp_noise_scale'",
                        model,
                        "Pass the DDP wrapper (not its .module), or drop 'ddp_noise_scale'",
                    )
                )
            self._ddp = weakref.ref(model)
        self.every = every
        self.history_size = history_size
        self.scaler = scaler
        self.trace_nonfinite = trace_nonfinite
        self.buffer_bytes = buffer_bytes
        modules = select_modules(fn, model, patterns)
        chosen = _select_params(model, modules, patterns)
        self._patterns = patterns
        # Held weakly: the monitor must not keep the model (or its layers) alive.
        self._modules = [(n, weakref.ref(m)) for n, m in modules]
        self._params = [(n, o, weakref.ref(p)) for n, o, p in chosen] if params else []
        self._diag_params = [(n, o, weakref.ref(p)) for n, o, p in chosen]
        names = [n for n, _ in self._modules] + [n for n, _, _ in self._params]
        clock = PassClock(on_start=self._start_pass, on_end=self._end_pass)
        self._buffer = PassBuffer(buffer_bytes, clock)
        self._calls = CallTracker(self._bag, weakref.ref(self._buffer), trace_nonfinite)
        order = {n: i for i, n in enumerate(names)}  # forward (registration) order
        self._history = History(history_size, order, vanishing, exploding)
        owners = list(dict.fromkeys(o for _, o, _ in chosen))
        self._groups = owners
        self._tracker = ParamTracker(
            [owners.index(o) for _, o, _ in chosen],
            len(owners),
            update="update_size" in self.diagnostics,
            origin="distance" in self.diagnostics,
        )
        self._ps: PerSampleSteps | None = None
        if any(d in PER_SAMPLE for d in self.diagnostics):
            self._ps = PerSampleSteps(
                weakref.ref(model),
                [n for n, _, _ in chosen],
                [owners.index(o) for _, o, _ in chosen],
                len(owners),
                self.diagnostics,
                loss_reduction,
                ema,
                scaler,
            )
        self._losses: LossSteps | None = None
        self._fwd_step: int | None = None  # the step whose forward ran last (record_loss)
        self._late_written = -1  # the last step whose alpha write_tensorboard wrote
        if any(d in LOSS_DIAGNOSTICS for d in self.diagnostics):
            self._losses = LossSteps(self.diagnostics, self._history)
        self._alpha: AlphaSteps | None = None
        if "alpha" in self.diagnostics and self._ps is not None:
            self._alpha = AlphaSteps(weakref.ref(model), [n for n, _, _ in chosen], every)
        self._tic: TicSteps | None = None
        if {"tic", "tic_trace"} & set(self.diagnostics):
            self._tic = TicSteps(
                weakref.ref(model),
                [n for n, _, _ in chosen],
                [owners.index(o) for _, o, _ in chosen],
                len(owners),
                loss_reduction,
            )
        self._ps_step: int | None = None  # the step of the per-sample context last finished
        if self._ps is not None:  # through a weak reference: no monitor <-> engine cycle
            self._ps.on_finish = _context_done_hook(weakref.ref(self))
        self._hist = (
            None
            if histogram_bins is None
            else HistogramSteps(histogram_bins, [n for n, _, _ in chosen])
        )
        self._model = weakref.ref(model)
        # scalars() key of the root module (a model that is itself a leaf, or matched by "*")
        self._root_key = "model" if "model" not in {n for n, _ in self._modules} else "model(root)"

    # -- thresholds (the history applies them when a step is read) -------------------------
    @property
    def vanishing(self) -> float:
        """L2-norm threshold below which a gradient is flagged vanishing."""
        return self._history.vanishing

    @property
    def exploding(self) -> float:
        """L2-norm threshold above which a gradient is flagged exploding."""
        return self._history.exploding

    # -- context --------------------------------------------------------------------------
    def _install(self) -> None:
        calls = weakref.ref(self._calls)
        for name, module_ref in self._modules:
            module = self._deref(module_ref, name)
            inplace = self.trace_nonfinite and getattr(module, "inplace", False) is True
            if inplace:  # it may overwrite its input: hook the input before it runs
                pre = _pre_hook(calls, name)
                self._bag.module(module.register_forward_pre_hook(pre, with_kwargs=True))
            hook = _fwd_hook(calls, name, self.trace_nonfinite and not inplace)
            self._bag.module(module.register_forward_hook(hook, with_kwargs=True))
        buffer = weakref.ref(self._buffer)
        for pname, owner, p_ref in self._params:
            p = self._deref(p_ref, pname)
            slot = Slot(PARAM, pname, 0, owner)
            self._bag.module(p.register_post_accumulate_grad_hook(_param_hook(buffer, slot)))
        for pname, _, p_ref in self._diag_params:
            self._deref(p_ref, pname)
        if self._tracker.update:
            hook = _optimizer_hook(weakref.ref(self))
            self._bag.module(register_optimizer_step_post_hook(hook))
        if self._ddp is not None:
            ddp = self._deref(self._ddp, "the DDP model")
            self._recorder = DDPNoiseRecorder(ddp.process_group)
            self._recorder.active = self._history.count % self.every == 0
            pre = _batch_hook(weakref.ref(self._recorder))
            self._bag.module(ddp.register_forward_pre_hook(pre, with_kwargs=True))
            attach(self._name, ddp, self._recorder)
        if self._ps is not None:
            ps = weakref.ref(self._ps)
            for pname, _, p_ref in self._diag_params:
                p = self._deref(p_ref, pname)
                self._bag.module(p.register_hook(_leaf_hook(ps, pname)))
        if self._ps is not None or self._losses is not None:
            model = self._deref(self._model, "the model")
            self._bag.module(model.register_forward_pre_hook(_forward_start(weakref.ref(self))))
        if self._ps is not None and self._wants_ps(self._history.count):
            self._ps.start()  # raises here for a model the per-sample engine refuses

    def _after_exit(self) -> None:
        ddp = None if self._ddp is None else self._ddp()
        if ddp is not None:
            attach(self._name, ddp, None)  # DDP's own averaging all-reduce again
        self._calls.clear()
        if self._buffer.slots:  # a pass whose end callback never ran (it raised)
            self._finish_pass()
        self._measure_update(final=True)
        if self._ps is not None:
            if not self._ps.finish():
                self._ps.close()
        if self._alpha is not None:  # the update of the last start point (optimizer inside)
            self._alpha.params_moved(self._live_params())
        if self._ps is not None:
            self._ps.release()  # after alpha: its kept context is the engine's
        self._materialize()

    def _on_forward_start(self) -> None:
        """The model is about to run: finish the last per-sample step, open the next one."""
        self._fwd_step = self._history.count
        ps = self._ps
        if ps is None:
            return
        ps.finish()
        if self._alpha is not None:  # the optimizer has stepped: project onto its update
            self._alpha.params_moved(self._live_params())
        if not ps.open:
            if self._wants_ps(self._history.count):
                ps.start()
            else:  # a step without diagnostics: no per-sample hooks (they stay while every=1)
                ps.idle()

    def _context_done(self, ps: Any, scale: Any) -> bool:
        """A per-sample context's statistics were taken; True: alpha keeps it open."""
        step, self._ps_step = self._ps_step, None
        if ps._second is not None:  # a second backward pass: no statistics (NaN, warned)
            if self._alpha is not None:
                self._alpha.skip()
            return False
        if self._tic is not None and step is not None:
            self._tic.moments(step, ps, scale, self._history.extras.get(step))
        return self._alpha is not None and self._alpha.context_done(ps, scale)

    def _wants_ps(self, step: int) -> bool:
        """Whether step ``step`` runs a per-sample context (alpha also wants step t+1's)."""
        if self._alpha is not None:
            return self._alpha.wants_context(step)
        return step % self.every == 0

    def _read(self) -> None:
        """Everything recorded so far, ready to read (per-sample work and the host copy)."""
        if self._ps is not None:
            self._ps.finish()
        self._materialize()

    def record_loss(self, losses: torch.Tensor) -> None:
        r"""Hand the monitor the per-sample losses ``l_i`` of the current step, shape ``(B,)``.

        Gives the diagnostics ``loss_mean`` = ``(1/B) sum_i l_i`` and ``loss_var`` =
        ``1/(B-1) sum_i (l_i - loss_mean)^2`` (unbiased; NaN for B = 1), and the loss
        observations of ``alpha``. A method rather than an argument: the losses exist only
        inside each step, and the monitor never sees the loss function. The losses belong to
        the step whose forward ran last (the monitor marks each forward of the model), so call
        it after the forward, before or after ``backward()``, once per step. The tensor is
        copied (detached, float64); nothing is synchronised until the diagnostics are read.
        With ``every > 1`` losses of steps without diagnostics are dropped, except those of
        the step after a diagnostic step when ``alpha`` is computed (its end point).

        Args:
            losses: a ``(B,)`` tensor of per-sample losses, e.g. from
                ``nn.functional.cross_entropy(out, y, reduction="none")``; the loss you
                backpropagate is their mean (or sum, ``loss_reduction="sum"``).

        Raises:
            TypeError: ``losses`` is not a real floating-point tensor.
            ValueError: the monitor computes no loss diagnostic (``loss_mean``, ``loss_var``,
                ``alpha``), no forward of the model ran inside the context yet, ``losses`` is
                not of shape ``(B,)`` (or its B is not the batch the per-sample engine saw),
                or the losses of this step were already recorded.

        Example:
            >>> from torch import nn
            >>> from gradlab.hooks import GradientMonitor
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> with GradientMonitor(net, diagnostics=("loss_mean", "loss_var")) as monitor:
            ...     losses = net(torch.randn(16, 4)).pow(2).flatten()  # (B,) per-sample losses
            ...     monitor.record_loss(losses)
            ...     losses.mean().backward()
            >>> {k: round(v, 4) for k, v in monitor.history[0].diagnostics.items()}
            {'loss_mean': 0.0308, 'loss_var': 0.0013}
            >>> round(losses.mean().item(), 4), round(losses.var().item(), 4)
            (0.0308, 0.0013)
        """
        fn = "GradientMonitor.record_loss"
        if self._losses is None:
            raise ValueError(
                message(
                    fn,
                    "diagnostics",
                    "one of 'loss_mean', 'loss_var', 'alpha' for the losses to be used",
                    self.diagnostics,
                    "Build the monitor with diagnostics=(..., 'loss_mean', 'loss_var') or "
                    "'alpha', or drop the call",
                )
            )
        values = check_losses(fn, losses)
        step = self._fwd_step
        if step is None:
            raise ValueError(
                f"{fn}: no forward of the model has run inside the monitor's context yet; "
                "call it after `out = model(x)` inside `with GradientMonitor(...) as monitor:`"
            )
        b = self._batch_of(step)
        if b is not None and b != values.numel():
            raise ValueError(
                f"{fn}: losses must have one entry per sample of the step's batch (B={b}, "
                f"what the per-sample engine saw), got shape {tuple(values.shape)}. Pass the "
                "per-sample losses of this batch (reduction='none')"
            )
        self._losses.record(fn, step, values)

    def record_tic(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        r"""Take the exact Hessian diagonal for the TIC of the current step (``"tic"``).

        With ``v_j = (1/B) sum_i g_ij^2`` from the per-sample pass and ``h`` the exact diagonal
        of the Hessian of the step's mean loss (:func:`gradlab.hessian_diagonal`,
        ``method="exact"``: Hessian backpropagation for chains of linear and convolution
        layers, else one Hessian-vector product per parameter entry), ``tic`` =
        ``sum_j v_j / (h_j + 1e-7)`` and ``tic_trace`` = ``sum_j v_j / (sum_j h_j + 1e-7)``
        (Thomas et al. 2019; Cockpit's TICDiag and TICTrace with ``diag_h``), per module and
        for the whole model.

        The Hessian needs the loss as a function of the model: ``loss_fn(model)`` recomputes
        the step's loss (the mean over the batch, or the sum with ``loss_reduction="sum"``) on
        the same batch; the monitor calls it on a copy of the model without hooks (so neither
        it nor the per-sample engine records those passes), at once. Call it after the forward
        and before ``optimizer.step()``. Opt-in and as often as you like: the TIC is computed
        on the diagnostic steps where it is called (call it e.g. every 100th step) and is NaN
        on the others; on a step without diagnostics (``every``) the call does nothing.

        Args:
            loss_fn: ``loss_fn(model) -> scalar loss`` of the step's batch, e.g.
                ``lambda m: nn.functional.cross_entropy(m(x), y)``.

        Raises:
            TypeError: ``loss_fn`` is not callable.
            ValueError: the monitor computes neither ``"tic"`` nor ``"tic_trace"``, no forward
                of the model ran inside the context yet, the step's Hessian was already
                taken, or ``loss_fn`` does not return a scalar tensor.

        Example:
            >>> from torch import nn
            >>> from gradlab.hooks import GradientMonitor
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
            >>> loss_fn = lambda m: nn.functional.mse_loss(m(x), y)
            >>> with GradientMonitor(net, diagnostics=("tic", "tic_trace")) as monitor:
            ...     loss_fn(net).backward()
            ...     monitor.record_tic(loss_fn)
            >>> {k: round(v, 3) for k, v in monitor.history[0].diagnostics.items()}
            {'tic': 55.133, 'tic_trace': 2.031}
        """
        fn = "GradientMonitor.record_tic"
        if self._tic is None:
            raise ValueError(
                message(
                    fn,
                    "diagnostics",
                    "one of 'tic', 'tic_trace' for the Hessian diagonal to be used",
                    self.diagnostics,
                    "Build the monitor with diagnostics=(..., 'tic') or drop the call",
                )
            )
        if not callable(loss_fn):
            raise TypeError(
                message(
                    fn,
                    "loss_fn",
                    "a function loss_fn(model) returning the step's loss",
                    loss_fn,
                    "E.g. lambda m: nn.functional.cross_entropy(m(x), y)",
                )
            )
        step = self._fwd_step
        if step is None:
            raise ValueError(
                f"{fn}: no forward of the model has run inside the monitor's context yet; "
                "call it after the step's forward (and before optimizer.step())"
            )
        if step % self.every:
            return
        if step in self._tic.done:
            raise ValueError(
                f"{fn}: the Hessian diagonal of step {step} was already taken; call "
                "record_tic once per step"
            )
        self._tic.hessian(fn, step, self._history.extras.get(step), loss_fn)

    def _batch_of(self, step: int) -> int | None:
        """The batch size the per-sample context of ``step`` saw, if known."""
        if self._alpha is not None and step in self._alpha.sizes:
            return self._alpha.sizes[step]
        ctx = getattr(self._ps, "_ps", None)  # the open (or done, not finished) context
        b = getattr(ctx, "_b", None)
        return (
            b
            if isinstance(b, int)
            and step == self._history.count - (0 if self._ps is not None and self._ps.open else 1)
            else None
        )

    # -- backward side ----------------------------------------------------------------------
    def _start_pass(self) -> None:
        if self._buffer.slots:  # the previous pass raised before its end callback
            self._finish_pass()
        self._measure_update(final=True)
        if len(self._history.pending) >= 64:
            self._materialize(only_ready=True)

    def _end_pass(self) -> None:
        self._finish_pass()
        # The handles and producer entries of a finished pass's graph are dead weight, but
        # pruning them costs a few microseconds per entry: only once they add up.
        self._bag.prune(above=_PRUNE_ABOVE)
        self._calls.prune(above=_PRUNE_ABOVE)

    def _finish_pass(self) -> None:
        taken = self._buffer.take()
        if taken is None:
            return
        slots, numels, stats, columns = taken
        history = self._history
        step = history.count
        history.count += 1
        host, event, scale = to_host(stats, self._scale_now())
        history.pending.append(Pending(step, slots, numels, columns, host, event, scale))
        norms = None if self._recorder is None else self._recorder.take()
        if self._recorder is not None:  # the next step: every rank agrees (same step count)
            self._recorder.active = history.count % self.every == 0
        diag = None
        if self.diagnostics and step % self.every == 0:
            diag = StepDiagnostics(self.diagnostics, self._groups)
            history.extras[step] = diag
            if norms is not None:
                diag.set_total_later(norms.ingredients)
            params = self._live_params()
            if params is not None:
                self._tracker.end_of_backward(params, diag)
            if self._losses is not None:
                self._losses.attach(step, diag)
        if self._hist is not None and step % self.every == 0:
            self._hist.take(step, self._live_params())
        if self._ps is not None and self._ps.open:
            self._ps_step = step
        if self._alpha is not None and self._ps is not None:
            self._alpha.backward_done(step, diag, self._live_params(), self._ps.open)
        if self._ps is not None:
            self._ps.backward_done(diag, scale)

    def _live_params(self) -> list[torch.Tensor] | None:
        params = [r() for _, _, r in self._diag_params]
        return None if any(p is None for p in params) else params  # type: ignore[return-value]

    def _measure_update(self, final: bool) -> None:
        if self._tracker.update:
            params = self._live_params()
            if params is not None:
                self._tracker.measure_update(params, final)

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

    def _materialize(self, *, only_ready: bool = False) -> None:
        self._history.materialize(trace=self.trace_nonfinite, only_ready=only_ready)

    # -- results ----------------------------------------------------------------------------
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
        self._read()
        return HistoryView(self._history)

    @property
    def grad_histograms(self) -> dict[str, GradHistogram]:
        """``{parameter: GradHistogram}``: gradient element histograms of the latest step.

        Only with ``histogram_bins=``: taken at the end of each diagnostic step's backward
        (steps ``0, every, ...``) from every monitored parameter's ``.grad``, in
        ``histogram_bins`` equal bins over its ``[min, max]``, on its device; only the latest
        step is kept (not in :meth:`state_dict`). A gradient holding NaN/Inf gets none.
        :func:`write_tensorboard` logs them with ``add_histogram_raw``.

        Example:
            >>> from torch import nn
            >>> from gradlab.hooks import GradientMonitor
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            >>> with GradientMonitor(net, histogram_bins=16) as monitor:
            ...     net(torch.randn(32, 4)).pow(2).mean().backward()
            >>> h = monitor.grad_histograms["0.weight"]
            >>> h.step, h.num, len(h.bucket_limits), sum(h.bucket_counts)
            (0, 32, 17, 32.0)
        """
        return {} if self._hist is None else self._hist.latest()

    @property
    def steps(self) -> int:
        """Number of backward passes recorded so far (no synchronisation)."""
        return self._history.count

    @property
    def nonfinite_source(self) -> NonfiniteSource | None:
        """The first NaN/Inf source seen (module, step, origin), or ``None`` while all finite."""
        self._read()
        return self._history.source

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
        * ``grad/scale`` and ``grad/skipped`` (1.0 or 0.0) with a ``scaler``;
        * ``diagnostics/<name>`` and ``diagnostics/<name>/<module>`` on the steps that computed
          the monitor's ``diagnostics`` (with ``every > 1``, only those steps have them).

        TensorBoard replaces characters other than letters, digits and ``-_./`` in a tag with
        ``_``; module names from ``named_modules()`` never hold any.

        Args:
            step: index into :attr:`history` (default: the last step). The step's own number is
                ``monitor.history[step].step``.

        Raises:
            TypeError: ``step`` is not an int.
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
        fn = "GradientMonitor.scalars"
        check_int(fn, "step", step, fix="An index into monitor.history: -1 for the last step")
        history = self.history
        if not history:
            raise ValueError(
                f"{fn}: no backward pass recorded yet; call it after "
                "loss.backward() inside `with GradientMonitor(model) as monitor:`"
            )
        if not -len(history) <= step < len(history):
            raise ValueError(
                f"{fn}: step={step} is out of range for {len(history)} "
                f"recorded steps; use -1 (the last) or 0..{len(history) - 1}"
            )
        return step_scalars(
            history[step],
            root=self._root_key,
            total=bool(self._params),
            scaler=self.scaler is not None,
        )

    # -- checkpoints -----------------------------------------------------------------------
    def _names(self) -> list[str]:
        return [n for n, _ in self._modules] + [n for n, _, _ in self._params]

    def state_dict(self) -> dict[str, Any]:
        """The recorded run: history, step count, NaN record and thresholds, for a checkpoint.

        Plain containers (dict, list, str, int, float, bool, None) and float64 tensors only, so
        it goes through ``torch.save`` / ``torch.load(weights_only=True)``, pickle and
        ``copy.deepcopy``; it is a snapshot (later steps do not change it). It also holds the
        monitored names and patterns (checked on load), the diagnostics' values and, with
        ``"distance"``, a copy of the starting parameters. Statistics of steps still on their
        way from the GPU are read first (one synchronisation). Call it between steps.

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
        self._read()
        h = self._history
        layouts, history = records_to_state(h.records)
        extras = []
        for step, diag in h.extras.items():
            total, by_module = diag.values()
            extras.append({"step": step, "values": total, "by_module": by_module})
        theta0 = self._tracker.theta0
        return {
            "version": STATE_VERSION,
            "steps": h.count,
            "vanishing": h.vanishing,
            "exploding": h.exploding,
            "nonfinite_source": None if h.source is None else list(h.source),
            "layouts": layouts,
            "history": history,
            "names": self._names(),
            "patterns": list(self._patterns),
            "diagnostics": extras,
            "theta0": None if theta0 is None else [t.detach().cpu().clone() for t in theta0],
            "ema": None if self._ps is None else self._ps.ema_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next backward pass is step ``steps``.

        Replaces the history, the step count, the NaN record, the ``vanishing`` /
        ``exploding`` thresholds (the ones the run was recorded with) and the diagnostics'
        values and starting point. What to record (patterns, ``params``, ``history_size``,
        ``scaler``, ``diagnostics``, ...) stays as this monitor was built: with a smaller
        ``history_size`` only the last steps are kept. Call it before entering the context or
        between steps. The state dict is not modified.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: it is not a GradientMonitor state dict (a key is missing or the
                version is unknown), or it was recorded on other modules or parameters, or
                under other patterns, than this monitor's (both lists are in the message).
        """
        fn = "GradientMonitor.load_state_dict"
        check_state(fn, state_dict)
        self._check_same_model(fn, state_dict)
        vanishing, exploding = float(state_dict["vanishing"]), float(state_dict["exploding"])
        records = records_from_state(state_dict, self.history_size)
        src = state_dict["nonfinite_source"]
        extras = {
            int(d["step"]): StepDiagnostics.restored(d["values"], d["by_module"])
            for d in state_dict.get("diagnostics", [])
        }
        self._materialize()
        h = self._history
        h.vanishing, h.exploding = vanishing, exploding
        h.records = records
        h.extras = extras
        if self._losses is not None:  # what was kept for the steps before the load
            self._losses.reset()
        if self._alpha is not None:
            self._alpha.close()
        h.count = int(state_dict["steps"])
        h.source = None if src is None else NonfiniteSource(str(src[0]), int(src[1]), src[2])
        theta0 = state_dict.get("theta0")
        params = self._live_params()
        if self._ps is not None:
            device = params[0].device if params else None
            self._ps.load_ema_state(state_dict.get("ema"), device)
        if theta0 is not None and self._tracker.origin and params:
            self._tracker.theta0 = [
                t.detach().to(p.device, p.dtype).clone() for t, p in zip(theta0, params)
            ]

    def _check_same_model(self, fn: str, state: dict[str, Any]) -> None:
        mine = self._names()
        if "names" in state:
            theirs = list(state["names"])
            same = theirs == mine
        else:  # version 1: the names its records hold must be this monitor's
            theirs = list(dict.fromkeys(_state_names(state)))
            same = set(theirs) <= set(mine)
        patterns = list(state.get("patterns", self._patterns))
        if same and patterns == list(self._patterns):
            return
        raise ValueError(
            f"{fn}: the state_dict was recorded on other modules than this monitor's; it holds "
            f"{theirs} (patterns {patterns}), this monitor records {mine} (patterns "
            f"{list(self._patterns)}). Load it into a GradientMonitor built on the same model "
            "with the same patterns and params="
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "GradientMonitor: a monitor cannot be pickled or copied (it hooks a live model); "
            "checkpoint monitor.state_dict() and restore it with "
            "GradientMonitor(model, ...).load_state_dict(state)"
        )

    def __repr__(self) -> str:
        src = self._history.source
        return (
            f"GradientMonitor({len(self._modules)} modules, {len(self._params)} parameters, "
            f"{self.steps} steps, first_nonfinite={None if src is None else src.module!r})"
        )


def _state_names(state: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for layout in state["layouts"]:
        names += [n for k, n in zip(layout["kinds"], layout["names"]) if k != 1]  # not inputs
    for d in state["history"]:
        if "outputs" in d:
            names += list(d["outputs"]) + list(d["params"])
    return names


def _check_args(
    fn: str,
    model: object,
    vanishing: object,
    exploding: object,
    buffer_bytes: object,
    history_size: object,
    every: object,
    params: object,
    trace_nonfinite: object,
    loss_reduction: object,
    ema: object,
    scaler: object,
) -> tuple[float, float]:
    """Check GradientMonitor's arguments (clear errors); returns the thresholds as floats."""
    check_model(fn, model)
    vanishing, exploding = _check_thresholds(fn, vanishing, exploding)
    if buffer_bytes is not None:
        check_int(fn, "buffer_bytes", buffer_bytes, minimum=0, fix="Or None: the default")
    if history_size is not None:
        check_int(fn, "history_size", history_size, minimum=1, fix="Or None: keep every step")
    check_int(fn, "every", every, minimum=1, fix="Pass every=1 to compute them every step")
    check_bool(fn, "params", params)
    check_choice(fn, "loss_reduction", loss_reduction, ("mean", "sum"))
    if ema is not None:
        check_float(
            fn,
            "ema",
            ema,
            low=0.0,
            high=1.0,
            high_open=True,
            fix="E.g. ema=0.9, or None for no smoothing",
        )
    check_bool(fn, "trace_nonfinite", trace_nonfinite)
    if scaler is not None:
        check_type(
            fn,
            "scaler",
            scaler,
            torch.amp.GradScaler,
            what="a torch.amp.GradScaler or None",
            fix="Pass the scaler whose scale(loss) you call backward on",
        )
    return vanishing, exploding


def _check_thresholds(fn: str, vanishing: object, exploding: object) -> tuple[float, float]:
    v = check_float(fn, "vanishing", vanishing, low=0.0, fix="E.g. vanishing=1e-7")
    e = check_float(
        fn, "exploding", exploding, low=0.0, low_open=True, finite=False, fix="E.g. exploding=1e3"
    )
    if not v < e:
        raise ValueError(
            message(
                fn,
                "vanishing",
                f"below exploding={exploding!r}",
                vanishing,
                "E.g. vanishing=1e-7, exploding=1e3",
            )
        )
    return v, e


def _pre_hook(ref: weakref.ref[CallTracker], name: str) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        calls = ref()
        if calls is not None and not REPLAY.depth:
            calls.before_call(name, (args, kwargs) if kwargs else args)  # args: a tuple

    return hook


def _fwd_hook(ref: weakref.ref[CallTracker], name: str, inputs: bool) -> Any:
    """Forward hook: hooks the outputs' gradients, and the inputs' if ``inputs``."""

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        calls = ref()
        if calls is None or REPLAY.depth:  # a per-sample engine's replay: not the user's
            return
        if inputs:
            calls.after_call(name, (args, kwargs) if kwargs else args, output)
        else:
            calls.outputs(name, output)

    return hook


def _param_hook(ref: weakref.ref[PassBuffer], slot: Slot) -> Any:
    def hook(p: torch.Tensor) -> None:
        buffer = ref()
        grad = p.grad  # (read once: each read wraps the tensor anew)
        if buffer is not None and grad is not None:
            buffer.add(slot, grad)

    return hook


def _leaf_hook(ref: weakref.ref[PerSampleSteps], name: str) -> Any:
    def hook(grad: torch.Tensor) -> None:
        steps = ref()
        if steps is not None:
            steps.grad(name, grad)

    return hook


def _forward_start(ref: weakref.ref[GradientMonitor]) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        monitor = ref()
        if monitor is not None and not REPLAY.depth:
            monitor._on_forward_start()

    return hook


def _batch_hook(ref: weakref.ref[DDPNoiseRecorder]) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        recorder = ref()
        if recorder is not None and not REPLAY.depth:
            recorder.start_forward(args, kwargs)

    return hook


def _context_done_hook(ref: weakref.ref[GradientMonitor]) -> Any:
    def hook(ps: Any, scale: Any) -> bool:
        monitor = ref()
        return False if monitor is None else monitor._context_done(ps, scale)

    return hook


def _optimizer_hook(ref: weakref.ref[GradientMonitor]) -> Any:
    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        monitor = ref()
        if monitor is not None:
            monitor._measure_update(final=False)

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
