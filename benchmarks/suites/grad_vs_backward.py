"""grad_vs_backward: the autograd tutorial's gradient-penalty experiment, exactly, then extended.

1. **The tutorial's experiment, exactly.** ``torch.manual_seed(1)``; ``model = nn.Linear(3, 2)``;
   ``opt = torch.optim.SGD(model.parameters(), lr=0.1)``; ``x = torch.ones(1, 3,
   requires_grad=True)``; then 10,000 iterations of::

       y = model(x).sum()
       g = <the gradient of y w.r.t. x, with create_graph=True>
       gp = (g**2).sum()
       opt.zero_grad(); gp.backward(); opt.step()

   where the gradient is taken two ways: ``backward``: ``y.backward(create_graph=True); g =
   x.grad`` (which also fills every parameter's ``.grad`` with a graph, a reference cycle torch
   warns about), and ``x.grad = None`` once ``g`` has been used, as the tutorial does: ``x`` is
   created once, and without the reset ``y.backward`` would *add* each iteration's gradient to
   the last one's (``x.grad`` keeps growing, and so does its graph); ``autograd.grad``: ``(g,) =
   torch.autograd.grad(y, x, create_graph=True)``. Each variant has its own model and optimizer,
   both made right after ``torch.manual_seed(1)`` (the global RNG is restored afterwards), so
   both walk the same trajectory: the table checks that their weights agree at the end. The
   10,000 iterations of each are run interleaved in 10 rounds of 1,000; ``total_s`` is their
   sum (seconds for 10,000 iterations) and the ratio the median of the 10 per-round ratios,
   printed beside the tutorial's own 3.5 s / 3.2 s.
2. **gradlab's ways of taking the same gradient** in the same loop: :func:`gradlab.grad`,
   :func:`gradlab.backward` and :func:`gradlab.penalties.gradient_penalty` with ``center=0``,
   ``weight=1`` (for one sample, ``||g||^2 = (g**2).sum()``), each against ``autograd.grad``.
3. **Larger critics**: the WGAN-GP step ``(||grad_x D(x)||_2 - 1)^2`` (batch mean) followed by
   ``penalty.backward()`` and ``zero_grad(set_to_none=True)``, via ``backward``,
   ``autograd.grad`` and gradlab's ``gradient_penalty``: time and peak memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

import gradlab
from benchmarks._core import Context, Ratio, Suite, Table, peak_memory, time_interleaved

TUTORIAL_ITERS = 10_000
TUTORIAL_ROUNDS = 10
# The tutorial's own measurement (total seconds for 10,000 iterations).
TUTORIAL_SECONDS = {"backward": 3.5, "autograd.grad": 3.2}


def _tutorial_setup() -> tuple[nn.Linear, torch.optim.SGD, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(1, 3, requires_grad=True)
    return model, opt, x


def tutorial_steps(
    device: torch.device, *, gradlab_variants: bool = False
) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Linear]]:
    """One iteration of the tutorial's loop per variant, each on its own model; and the models.

    ``gradlab_variants=False``: the tutorial's two (``backward``, ``autograd.grad``); ``True``:
    ``autograd.grad`` (the baseline) and gradlab's three.
    """
    steps: dict[str, Callable[[], None]] = {}
    models: dict[str, nn.Linear] = {}

    def make(name: str, gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        model, opt, x = _tutorial_setup()
        model.to(device)
        x = x.detach().to(device).requires_grad_(True)

        def step() -> None:
            y = model(x).sum()
            g = gradient(y, x)
            gp = (g**2).sum()
            opt.zero_grad()
            gp.backward()
            opt.step()
            x.grad = None  # the tutorial's reset (only the backward variant ever sets it)

        steps[name], models[name] = step, model

    def via_backward(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y.backward(create_graph=True)
        assert x.grad is not None
        return x.grad

    def via_grad(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(y, x, create_graph=True)[0]

    if not gradlab_variants:
        make("backward", via_backward)
        make("autograd.grad", via_grad)
        return steps, models

    from gradlab.penalties import gradient_penalty

    make("autograd.grad", via_grad)
    make("gradlab.grad", lambda y, x: gradlab.grad(y, x, create_graph=True))  # type: ignore[arg-type,return-value]
    make("gradlab.backward", lambda y, x: gradlab.backward(y, x, create_graph=True))  # type: ignore[arg-type,return-value]

    # gradient_penalty computes the critic itself: its "gradient" is the penalty's square root.
    model, opt, x = _tutorial_setup()
    model.to(device)
    x = x.detach().to(device)

    def gp_step() -> None:
        gp = gradient_penalty(lambda v: model(v).sum(1), x, x, weight=1.0, center=0.0)
        opt.zero_grad()
        gp.backward()
        opt.step()

    steps["gradlab gradient_penalty(center=0)"] = gp_step
    models["gradlab gradient_penalty(center=0)"] = model
    return steps, models


def make_steps(model: nn.Module, inp: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The WGAN-GP step variants for one critic and one batch of inputs (part 3)."""
    from gradlab.penalties import gradient_penalty

    def norm_penalty(g: torch.Tensor) -> torch.Tensor:
        return ((g.flatten(1).norm(dim=1) - 1.0) ** 2).mean()

    def via_backward() -> None:
        x = inp.detach().requires_grad_(True)
        y = model(x)
        y.backward(torch.ones_like(y), create_graph=True)
        assert x.grad is not None
        norm_penalty(x.grad).backward()
        model.zero_grad(set_to_none=True)

    def via_grad() -> None:
        x = inp.detach().requires_grad_(True)
        y = model(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        norm_penalty(g).backward()
        model.zero_grad(set_to_none=True)

    def via_gradlab() -> None:
        gradient_penalty(model, inp, inp, weight=1.0, center=1.0).backward()
        model.zero_grad(set_to_none=True)

    return {"backward": via_backward, "autograd.grad": via_grad, "gradlab": via_gradlab}


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
        return [_tutorial(ctx), _gradlab_variants(ctx), _critics(ctx)]


def _same_weights(models: dict[str, nn.Linear]) -> str:
    first = next(iter(models.values()))
    same = all(
        torch.allclose(m.weight, first.weight, rtol=1e-5, atol=1e-6)
        and torch.allclose(m.bias, first.bias, rtol=1e-5, atol=1e-6)
        for m in models.values()
    )
    return "yes" if same else "NO"


def _tutorial(ctx: Context) -> Table:
    per_round = ctx.calls(TUTORIAL_ITERS // TUTORIAL_ROUNDS)
    iters = per_round * TUTORIAL_ROUNDS
    steps, models = tutorial_steps(ctx.device)
    ctx.progress(f"tutorial experiment: {iters:,} iterations each, {TUTORIAL_ROUNDS} rounds")
    timings, ratios = time_interleaved(
        steps, ctx=ctx, baseline="autograd.grad", number=per_round, rounds=TUTORIAL_ROUNDS
    )
    n_rounds = len(timings["autograd.grad"].times)
    iters = per_round * n_rounds
    totals = {n: sum(t.times) * per_round for n, t in timings.items()}
    same = _same_weights(models)
    table = Table(
        f"The tutorial's experiment exactly: Linear(3, 2), SGD lr 0.1, x = ones(1, 3), "
        f"{iters:,} iterations each",
        ["variant", "total_s", "tutorial_total_s", "ratio_vs_grad", "tutorial_ratio"],
        notes=[
            f"total_s: seconds for all {iters:,} iterations of the variant (warm-up excluded), "
            f"run interleaved with the other in {n_rounds} rounds of {per_round:,}. "
            "tutorial_total_s: the tutorial's measurement of the same loop (another machine, "
            "another torch).",
            "ratio_vs_grad: median over the rounds of time(variant) / time(autograd.grad) in "
            "the same round; its spread also covers total_s(variant) / total_s(autograd.grad). "
            "tutorial_ratio: 3.5 s / 3.2 s.",
            f"Both variants start from the same seed and weights; same weights after the last "
            f"iteration (every optimizer step identical): {same}.",
        ],
    )
    for name in steps:
        base = totals["autograd.grad"]
        ratio = Ratio(ratios[name].samples, medians_ratio=totals[name] / base)  # type: ignore[attr-defined]
        table.add(
            variant=name,
            total_s=totals[name],
            tutorial_total_s=TUTORIAL_SECONDS[name],
            ratio_vs_grad=ratio,
            tutorial_ratio=TUTORIAL_SECONDS[name] / TUTORIAL_SECONDS["autograd.grad"],
        )
    return table


def _agree(ctx: Context) -> str:
    """Whether gradlab's variants make the same 5 SGD steps as autograd.grad (untimed)."""
    steps, models = tutorial_steps(ctx.device, gradlab_variants=True)
    for step in steps.values():
        for _ in range(5):
            step()
    return _same_weights(models)


def _gradlab_variants(ctx: Context) -> Table:
    agree = _agree(ctx)
    steps, _ = tutorial_steps(ctx.device, gradlab_variants=True)
    ctx.progress(f"tutorial loop, gradlab's variants: {list(steps)}")
    timings, ratios = time_interleaved(steps, ctx=ctx, baseline="autograd.grad")
    table = Table(
        "The tutorial's loop with gradlab's ways of taking the gradient",
        ["variant", "median_s", "ratio_vs_grad"],
        notes=[
            "median_s: one iteration (forward, gradient, (g**2).sum(), zero_grad, backward, "
            "SGD step). ratio_vs_grad: median over interleaved rounds of time(variant) / "
            "time(autograd.grad) in the same round.",
            "gradient_penalty(center=0, weight=1) on real == fake == x: mean over the batch of "
            "||g||^2, for one sample (g**2).sum().",
            f"Same weights as autograd.grad's after 5 steps from the same start (checked "
            f"untimed): {agree}.",
        ],
    )
    for name in steps:
        table.add(variant=name, median_s=timings[name].median, ratio_vs_grad=ratios[name])
    return table


def _critics(ctx: Context) -> Table:
    dev = ctx.device
    batch_conv = ctx.pick(4, 8, 64)
    cases = [
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
            f"DCGAN critic 64x64 width {ctx.pick(32, 64, 64)} b={batch_conv}",
            _dcgan_critic(ctx.pick(32, 64, 64)),
            torch.randn(batch_conv, 3, 64, 64),
        ),
    ]
    table = Table(
        "WGAN-GP step time and peak memory by critic",
        ["case", "variant", "median_s", "ratio_vs_grad", "peak_bytes"],
        notes=[
            "ratio_vs_grad: median over interleaved rounds of time(variant) / "
            "time(autograd.grad) in the same round."
        ],
    )
    mem_method = ""
    for label, model, inp in cases:
        model, inp = model.to(dev), inp.to(dev)
        steps = make_steps(model, inp)
        ctx.progress(f"{label}: timing {list(steps)}")
        timings, ratios = time_interleaved(steps, ctx=ctx, baseline="autograd.grad")  # type: ignore[arg-type]
        for name, fn in steps.items():
            peak, mem_method = peak_memory(fn, dev)
            table.add(
                case=label,
                variant=name,
                median_s=timings[name].median,
                ratio_vs_grad=ratios[name],
                peak_bytes=peak,
            )
    table.notes.append(f"peak_bytes: {mem_method}, one step after a warm-up step.")
    return table


SUITE = Suite(
    name="grad_vs_backward",
    description="The tutorial's GP experiment exactly (backward(create_graph=True) vs "
    "autograd.grad), gradlab's variants, larger critics",
    run=run,
    seconds={"quick": 12, "default": 24, "full": 90},
)
