"""grad_vs_backward: the autograd tutorials' gradient-penalty experiment, reproduced and extended.

One gradient-penalty training step, ``(||grad_x D(x)||_2 - 1)^2`` averaged over the batch and then
backpropagated to the critic's parameters, is computed three ways:

``backward``
    ``y.backward(ones, create_graph=True)`` then ``x.grad`` (what the tutorials show first; it also
    fills every parameter's ``.grad`` with a graph, a reference cycle torch warns about);
``autograd.grad``
    ``torch.autograd.grad(y, x, ones, create_graph=True)`` (only the input gradient is built);
``gradlab``
    :func:`gradlab.penalties.gradient_penalty` with ``center=1`` on ``real == fake`` (so the
    interpolate is the input itself), present only once ``gradlab.penalties`` provides it.

Each is followed by ``penalty.backward()`` and ``zero_grad(set_to_none=True)``. At ``Linear(3, 2)``
the steps run a fixed 10,000 iterations each, interleaved in rounds of 1,000, as in the tutorial
(which measured 3.5 s vs 3.2 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks._core import Context, Suite, Table, peak_memory, time_interleaved


def _norm_penalty(g: torch.Tensor) -> torch.Tensor:
    return ((g.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def make_steps(model: nn.Module, inp: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The step variants for one critic and one batch of inputs."""

    def via_backward() -> None:
        x = inp.detach().requires_grad_(True)
        y = model(x)
        y.backward(torch.ones_like(y), create_graph=True)
        g = x.grad
        assert g is not None
        _norm_penalty(g).backward()
        model.zero_grad(set_to_none=True)

    def via_grad() -> None:
        x = inp.detach().requires_grad_(True)
        y = model(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        _norm_penalty(g).backward()
        model.zero_grad(set_to_none=True)

    steps: dict[str, Callable[[], None]] = {"backward": via_backward, "autograd.grad": via_grad}
    try:
        from gradlab.penalties import gradient_penalty  # type: ignore[attr-defined]
    except ImportError:
        return steps

    def via_gradlab() -> None:
        gradient_penalty(model, inp, inp, weight=1.0, center=1.0).backward()
        model.zero_grad(set_to_none=True)

    steps["gradlab"] = via_gradlab
    return steps


def _dcgan_critic(width: int) -> nn.Module:
    # DCGAN discriminator for 64x64 RGB, without BatchNorm (WGAN-GP uses no batch coupling).
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(w, 2 * w, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4 * w, 8 * w, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8 * w, 1, 4, 1, 0),
        nn.Flatten(),
    )


def run(ctx: Context) -> list[Table]:
    # The backward variant triggers torch's create_graph reference-cycle warning on every step:
    # silence it for this suite only, not for the suites that run after it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        return _run(ctx)


def _run(ctx: Context) -> list[Table]:
    dev = ctx.device
    tables = []

    # 1. The tutorial's experiment: fixed iteration count, interleaved rounds.
    iters = ctx.pick(2000, 10_000, 10_000)
    rounds = 10
    model = nn.Linear(3, 2).to(dev)
    inp = torch.randn(4, 3, device=dev)
    steps = make_steps(model, inp)
    ctx.progress(f"Linear(3, 2): {iters} iterations per variant, {rounds} interleaved rounds")
    timings, ratios = time_interleaved(
        steps, ctx=ctx, baseline="autograd.grad", number=iters // rounds, rounds=rounds
    )
    t1 = Table(
        f"Tutorial experiment: GP step on Linear(3, 2), batch 4, {iters} iterations each",
        ["variant", "total_s", "per_step_s", "iqr_s", "ratio_vs_grad"],
        notes=[
            "ratio_vs_grad: median over rounds of time(variant) / time(autograd.grad); "
            "the tutorial measured backward/grad = 3.5 s / 3.2 s = 1.09x."
        ],
    )
    for name, tm in timings.items():
        t1.add(
            variant=name,
            total_s=tm.median * iters,
            per_step_s=tm.median,
            iqr_s=tm.iqr,
            ratio_vs_grad=ratios[name],
        )
    tables.append(t1)

    # 2. Larger critics: time and peak memory.
    batch_conv = ctx.pick(4, 16, 64)
    cases = [
        ("Linear(3,2) b=4", nn.Linear(3, 2), torch.randn(4, 3)),
        (
            "MLP 784-512-512-1 b=64",
            nn.Sequential(
                nn.Linear(784, 512),
                nn.LeakyReLU(0.2),
                nn.Linear(512, 512),
                nn.LeakyReLU(0.2),
                nn.Linear(512, 1),
            ),
            torch.randn(64, 784),
        ),
        (
            f"DCGAN critic 64x64 b={batch_conv}",
            _dcgan_critic(ctx.pick(32, 64, 64)),
            torch.randn(batch_conv, 3, 64, 64),
        ),
    ]
    t2 = Table(
        "GP step time and peak memory by critic",
        ["case", "variant", "median_s", "iqr_s", "ratio_vs_grad", "peak_bytes"],
    )
    mem_method = ""
    for label, model, inp in cases:
        model, inp = model.to(dev), inp.to(dev)
        steps = make_steps(model, inp)
        ctx.progress(f"{label}: timing {list(steps)}")
        timings, ratios = time_interleaved(steps, ctx=ctx, baseline="autograd.grad")
        for name, fn in steps.items():
            peak, mem_method = peak_memory(fn, dev)
            t2.add(
                case=label,
                variant=name,
                median_s=timings[name].median,
                iqr_s=timings[name].iqr,
                ratio_vs_grad=ratios[name],
                peak_bytes=peak,
            )
    t2.notes.append(f"peak_bytes: {mem_method}, one step after a warm-up step.")
    tables.append(t2)
    return tables


SUITE = Suite(
    name="grad_vs_backward",
    description="GP step via backward(create_graph=True) vs torch.autograd.grad vs gradlab",
    run=run,
)
