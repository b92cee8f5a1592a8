"""per_sample: the cost of per-sample gradient statistics against a plain training step.

Every variant runs one step (``zero_grad(set_to_none=True)``, forward, cross-entropy,
``backward``) on its own copy of the model, and reads its result:

``plain``                 the step alone (the baseline of every ratio);
``gradlab_norms``         :class:`gradlab.per_sample.PerSampleGradients` with ``stats=("norm",)``,
                          ``ps.norm`` read (ghost norms on linear layers);
``gradlab_norms_sum_sq``  ``stats=("norm", "sum_sq")``;
``gradlab_grads``         ``stats=("grad",)``: every per-sample gradient stored;
``vmap_grad``             :func:`gradlab.per_sample.per_sample_grads` (``vmap(grad)``, the
                          ``torch.func`` recipe: the per-sample gradients alone, ``B x P``
                          stored, no ``.grad``);
``backpack_*``            BackPACK's ``BatchL2Grad``, ``BatchL2Grad + SumGradSquared`` and
                          ``BatchGrad`` (when ``backpack-for-pytorch`` is installed);
``opacus_ghost``          Opacus ``GradSampleModuleFastGradientClipping`` (ghost norms),
                          ``opacus_hooks`` ``GradSampleModule`` (per-sample gradients) (when
                          ``opacus`` is installed).

Models: an MLP 784-1024-1024-10 (norms at batch 128; per-sample gradients at 16, 128 with
``--full``) and a CNN of about 545k parameters on 3x32x32 (norms at batch 32, 64 with ``--full``;
gradients at 8); smaller models and batches with ``--quick``. Goals: the
norms step at most 1.2x plain on the MLP, at most BackPACK ``BatchL2Grad`` on the CNN; the
per-sample gradients at most BackPACK ``BatchGrad`` and ``vmap(grad)``; the norms step's peak
tensor memory at most 1.2x plain's.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._core import Context, Suite, Table, judge, peak_memory, time_alternating
from gradlab.per_sample import PerSampleGradients, per_sample_grads

_BLOCK, _SKIP = 4, 1
_GOAL_NORMS = 1.2
_GOAL_MEMORY = 1.2


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def cnn(scale: int = 1) -> nn.Module:
    """About 545k parameters at scale 1 (3x32x32 input)."""
    c = [32 // scale, 64 // scale, 128 // scale, 128 // scale]
    return nn.Sequential(
        nn.Conv2d(3, c[0], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c[0], c[1], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c[1], c[2], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c[2], c[3], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c[3] * 16, 150 // scale),
        nn.ReLU(),
        nn.Linear(150 // scale, 10),
    )


NORMS = (
    "gradlab_norms",
    "gradlab_norms_sum_sq",
    "backpack_l2",
    "backpack_l2_sum_sq",
    "opacus_ghost",
)
GRADS = ("gradlab_grads", "vmap_grad", "backpack_batch_grad", "opacus_hooks")


def make_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, family: tuple[str, ...] = NORMS + GRADS
) -> dict[str, Callable[[], object]]:
    """``plain`` and the variants of ``family`` that can run here, each on its own copy of
    ``model``."""

    def own() -> nn.Module:
        return copy.deepcopy(model)

    def plain_step(net: nn.Module) -> Callable[[], object]:
        def step() -> object:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            return None

        return step

    def gradlab(stats: tuple[str, ...]) -> Callable[[], object]:
        net = own()

        def step() -> object:
            net.zero_grad(set_to_none=True)
            with PerSampleGradients(net, stats=stats) as ps:
                F.cross_entropy(net(x), y).backward()
            return ps.grad if "grad" in stats else ps.norm

        return step

    net_v = own()

    def vmap_grad() -> object:
        from torch.func import functional_call

        params = dict(net_v.named_parameters())

        def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(net_v, p, (xb,)), yb)

        return per_sample_grads(loss, params, x, y)  # the gradients alone, as gradlab_grads

    steps: dict[str, Callable[[], object]] = {
        "plain": plain_step(model),
        "gradlab_norms": gradlab(("norm",)),
        "gradlab_norms_sum_sq": gradlab(("norm", "sum_sq")),
        "gradlab_grads": gradlab(("grad",)),
        "vmap_grad": vmap_grad,
    }
    if importlib.util.find_spec("backpack") is not None:
        steps.update(_backpack_steps(own, x, y))
    if importlib.util.find_spec("opacus") is not None:
        steps.update(_opacus_steps(own, x, y))
    return {n: f for n, f in steps.items() if n == "plain" or n in family}


def _backpack_steps(own, x, y) -> dict[str, Callable[[], object]]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared

    def variant(*make_ext: type) -> Callable[[], object]:
        net = extend(own())
        lossfunc = extend(nn.CrossEntropyLoss())

        def step() -> object:
            net.zero_grad(set_to_none=True)
            with backpack(*(e() for e in make_ext)), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lossfunc(net(x), y).backward()
            return None

        return step

    return {
        "backpack_l2": variant(BatchL2Grad),
        "backpack_l2_sum_sq": variant(BatchL2Grad, SumGradSquared),
        "backpack_batch_grad": variant(BatchGrad),
    }


def _opacus_steps(own, x, y) -> dict[str, Callable[[], object]]:
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghost = GradSampleModuleFastGradientClipping(
            own(), max_grad_norm=1.0, use_ghost_clipping=True
        )
        hooks = GradSampleModule(own())

    def ghost_step() -> object:
        ghost.zero_grad(set_to_none=True)
        F.cross_entropy(ghost(x), y).backward()
        return ghost.get_norm_sample()

    def hooks_step() -> object:
        hooks.zero_grad(set_to_none=True)
        F.cross_entropy(hooks(x), y).backward()
        return [p.grad_sample for p in hooks.parameters()]

    return {"opacus_ghost": ghost_step, "opacus_hooks": hooks_step}


# The comparisons: variant -> (the variant it is compared with, goal on the ratio)
_VERSUS = {
    "gradlab_norms": [
        ("backpack_l2", "cnn", 1.0),
        ("opacus_ghost", "cnn", 1.0),
    ],
    "gradlab_grads": [
        ("backpack_batch_grad", None, 1.0),
        ("vmap_grad", None, 1.0),
        ("opacus_hooks", None, 1.0),
    ],
}


def run(ctx: Context) -> list[Table]:
    dev = ctx.device
    torch.manual_seed(0)
    width, cnn_scale = ctx.pick(256, 1024, 1024), ctx.pick(4, 1, 1)
    models = {"mlp": mlp(width).to(dev), "cnn": cnn(cnn_scale).to(dev)}
    inputs = {"mlp": (784,), "cnn": (3, 32, 32)}
    # (model, family, batch): the norms at the anchors' batches; per-sample gradients (B x P
    # stored, memory-bound) at small batches unless --full
    plan = [
        ("mlp", "norms", ctx.pick(32, 128, 128)),
        ("mlp", "grads", ctx.pick(8, 16, 128)),
        ("cnn", "norms", ctx.pick(8, 32, 64)),
        ("cnn", "grads", ctx.pick(4, 8, 64)),
    ]
    times = Table(
        "Per-sample statistics: one training step, ratio to plain (and to the peers)",
        [
            "case",
            "variant",
            "median_s",
            "iqr_s",
            "ratio_to_plain",
            "versus",
            "ratio_to_versus",
            "target",
        ],
        keys=["case", "variant", "versus"],
        notes=[
            "Each variant is timed against plain alone, alternating in runs of 4 steps, the first "
            "not recorded (time_alternating, block=4, skip=1; slow variants block=2); "
            "ratio_to_plain is the median over turns. versus: a second pair, the variant against "
            "the peer named, measured the same way; ratio_to_versus < 1: gradlab is faster.",
            "Goals: gradlab_norms <= 1.2x plain on the MLP and <= 1.0x BackPACK BatchL2Grad and "
            "Opacus ghost norms on the CNN; gradlab_grads <= 1.0x BackPACK BatchGrad, Opacus "
            "hooks and vmap(grad). Peers are absent when not installed.",
            "The anchors were measured with one thread (OMP_NUM_THREADS=1); per-sample gradients "
            "at small batches by default (they store B x P numbers), at the anchors' with --full.",
        ],
    )
    memory = Table(
        "Peak tensor memory of one step, ratio to plain",
        ["case", "variant", "peak_bytes", "memory_ratio", "target"],
        notes=["CPU: live tensor storage bytes created during the step (TorchDispatchMode)."],
    )
    for kind, family, batch in plan:
        model = models[kind]
        nparams = sum(p.numel() for p in model.parameters())
        name = f"MLP 784-{width}-{width}-10" if kind == "mlp" else "CNN 3x32x32"
        label = f"{name} ({nparams / 1e3:.0f}k params), b={batch}"
        x = torch.randn(batch, *inputs[kind], device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        steps = make_steps(model, x, y, NORMS if family == "norms" else GRADS)
        _time_case(ctx, times, label, kind, steps)
        _memory_case(memory, label, steps, dev)
    return [times, memory]


def _time_case(
    ctx: Context, times: Table, label: str, kind: str, steps: dict[str, Callable[[], object]]
) -> None:
    plain_times: list[float] = []
    for name, fn in steps.items():
        if name == "plain":
            continue
        ctx.progress(f"{label}: plain vs {name}")
        slow = name in GRADS or name.startswith("backpack_l2_sum")
        timings, ratios = time_alternating(
            {"plain": steps["plain"], name: fn},
            ctx=ctx,
            baseline="plain",
            block=2 if slow else _BLOCK,
            skip=1 if slow else _SKIP,
        )
        plain_times.extend(timings["plain"].times)
        target = None
        if name == "gradlab_norms" and kind == "mlp":
            target = judge(ratios[name], at_most=_GOAL_NORMS)
        times.add(
            case=label,
            variant=name,
            median_s=timings[name].median,
            iqr_s=timings[name].iqr,
            ratio_to_plain=ratios[name],
            target=target,
        )
        for peer, only, goal in _VERSUS.get(name, []):
            if peer not in steps or (only is not None and only != kind):
                continue
            ctx.progress(f"{label}: {peer} vs {name}")
            _, vs = time_alternating(
                {peer: steps[peer], name: fn}, ctx=ctx, baseline=peer, block=2, skip=1
            )
            times.add(
                case=label,
                variant=name,
                versus=peer,
                ratio_to_versus=vs[name],
                target=judge(vs[name], at_most=goal),
            )
    plain_times.sort()
    times.add(case=label, variant="plain", median_s=plain_times[len(plain_times) // 2])


def _memory_case(
    memory: Table, label: str, steps: dict[str, Callable[[], object]], dev: torch.device
) -> None:
    base, how = peak_memory(steps["plain"], dev)
    memory.notes[0] = f"Peak extra memory of one step: {how}."
    memory.add(case=label, variant="plain", peak_bytes=base, memory_ratio=1.0)
    for name in ("gradlab_norms", "gradlab_norms_sum_sq", "gradlab_grads", "vmap_grad"):
        if name not in steps:
            continue
        try:
            peak, _ = peak_memory(steps[name], dev)
        except Exception as e:  # a tracing mode that a variant cannot run under
            memory.add(case=label, variant=name, target=f"not measured: {type(e).__name__}")
            continue
        ratio = peak / base if base else float("nan")
        target = judge(ratio, at_most=_GOAL_MEMORY) if name == "gradlab_norms" else None
        memory.add(case=label, variant=name, peak_bytes=peak, memory_ratio=ratio, target=target)


SUITE = Suite(
    name="per_sample",
    description="Per-sample gradient norms, moments and gradients (gradlab.per_sample) vs a "
    "plain step, vmap(grad), BackPACK and Opacus",
    run=run,
    seconds={"quick": 9, "default": 145, "full": 900},
)
