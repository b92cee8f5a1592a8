"""penalties: what gradlab's GAN penalties cost in a training step, and against hand-written code.

Tables:

1. *Penalty step cost*: one critic training step (adversarial loss + penalty, backward,
   zero_grad) for every registered penalty and method (``gradlab.penalties.PENALTIES``: a new
   penalty gets its row without touching this file), relative to the plain critic step without a
   penalty, on a DCGAN-style conv critic; then option variants: ``r1 (outputs=)`` reuses the
   adversarial forward pass on the reals (StyleGAN2's way); ``lazy r1 (every 16)`` runs 16 steps
   with R1 (gain 16) on the first, and is reported per step (amortized). A generator row does
   the same for the path length penalty.
2. *gradient_penalty vs hand-written*: the GP part of a step (interpolate, critic forward,
   ``torch.autograd.grad`` with ``create_graph``, norm, backward) written by hand the best way
   (one ``torch.rand`` per sample, one ``torch.lerp``, ``torch.autograd.grad``, ``vector_norm``
   over the sample dimensions, ``weight * ((norm - 1) ** 2).mean()``, the formula as papers and
   tutorials write it) against ``gradlab.penalties.gradient_penalty``. Target: ratio <= 1.03.
3. *R1: exact vs finite-difference*: a full critic step (non-saturating loss on fake and real,
   R1, backward) with exact R1 (double backward) and with ``method="finite-difference"`` (one
   extra forward and a first-order backward), each without and with ``outputs=`` (R1 on the
   adversarial forward pass), relative to the exact R1 step without ``outputs=``; on the DCGAN
   critic and on an MLP critic.

The ``backward(create_graph=True)`` vs ``autograd.grad`` experiment, with peak memory, is the
``grad_vs_backward`` suite, which includes ``gradient_penalty`` as its ``gradlab`` row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks._core import Context, Suite, Table, judge, time_interleaved
from gradlab.penalties import (
    PENALTIES,
    LazyRegularizer,
    PathLengthPenalty,
    PenaltyEntry,
    gradient_penalty,
    r1_penalty,
)


def _registered(
    entry: PenaltyEntry,
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    method: str,
    gen: torch.Generator,
) -> Callable[[], torch.Tensor]:
    """``entry``'s penalty on the samples it takes, with ``method`` (and ``gen`` for draws)."""
    kw: dict[str, object] = {} if method == "exact" else {"method": method}
    if entry.random or method != "exact":
        kw["generator"] = gen
    samples = entry.samples(real, fake)
    return lambda: entry.fn(critic, *samples, **kw)


def _dcgan_critic(width: int, size: int) -> nn.Module:
    """DCGAN discriminator without BatchNorm for size x size RGB (size 32 or 64)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
    w, s = width, size // 2
    while s > 4:
        layers += [nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2)]
        w, s = 2 * w, s // 2
    layers += [nn.Conv2d(w, 1, 4, 1, 0), nn.Flatten()]
    return nn.Sequential(*layers)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.LeakyReLU(0.2),
        nn.Linear(512, 512),
        nn.LeakyReLU(0.2),
        nn.Linear(512, 1),
    )


def _critic_steps(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, Callable[[], None]]:
    def adversarial() -> torch.Tensor:
        return critic(fake).mean() - critic(real).mean()

    def step(penalty: Callable[[], torch.Tensor] | None) -> Callable[[], None]:
        def run() -> None:
            loss = adversarial()
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            critic.zero_grad(set_to_none=True)

        return run

    def r1_reuse() -> None:
        x = real.detach().requires_grad_(True)
        d_real = critic(x)
        loss = critic(fake).mean() - d_real.mean() + r1_penalty(critic, x, outputs=d_real)
        loss.backward()
        critic.zero_grad(set_to_none=True)

    gen = torch.Generator(device=real.device).manual_seed(0)

    def r1_fd_reuse() -> None:
        d_real = critic(real)
        r1 = r1_penalty(critic, real, outputs=d_real, method="finite-difference", generator=gen)
        loss = critic(fake).mean() - d_real.mean() + r1
        loss.backward()
        critic.zero_grad(set_to_none=True)

    lazy = LazyRegularizer(every=16)

    def lazy_r1_16() -> None:
        for i in range(lazy.every):
            loss = adversarial()
            if lazy.is_due(i):
                loss = loss + lazy.gain * r1_penalty(critic, real)
            loss.backward()
            critic.zero_grad(set_to_none=True)

    plain = step(None)

    def plain_16() -> None:
        for _ in range(lazy.every):
            plain()

    steps: dict[str, Callable[[], None]] = {"plain": plain}
    for entry in PENALTIES.values():  # every registered penalty and method
        for method in entry.methods:
            label = entry.name if method == "exact" else f"{entry.name} {method}"
            steps[label] = step(_registered(entry, critic, real, fake, method, gen))
    steps.update(  # option variants
        {
            "wgan-lp (one_sided)": step(
                lambda: gradient_penalty(critic, real, fake, one_sided=True)
            ),
            "zero-centred gp": step(lambda: gradient_penalty(critic, real, fake, center=0.0)),
            "r1 (outputs=)": r1_reuse,
            "r1 finite-difference (outputs=)": r1_fd_reuse,
            "_plain x16": plain_16,
            "_lazy r1 x16": lazy_r1_16,
        }
    )
    return steps


def _generator_steps(batch: int, device: torch.device) -> dict[str, Callable[[], None]]:
    synthesis = nn.Sequential(
        nn.Linear(64, 128 * 4 * 4),
        nn.Unflatten(1, (128, 4, 4)),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(128, 64, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(64, 32, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(32, 3, 4, 2, 1),
        nn.Tanh(),
    ).to(device)
    pl = PathLengthPenalty().to(device)
    z = torch.randn(batch, 64, device=device)

    def plain() -> None:
        synthesis(z).square().mean().backward()
        synthesis.zero_grad(set_to_none=True)

    def with_pl() -> None:
        w = z.detach().requires_grad_(True)
        images = synthesis(w)
        (images.square().mean() + pl(images, w)).backward()
        synthesis.zero_grad(set_to_none=True)

    return {"plain": plain, "path length": with_pl}


def _gp_pair(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, Callable[[], None]]:
    b = real.shape[0]
    view = (b,) + (1,) * (real.ndim - 1)
    dims = tuple(range(1, real.ndim))

    def hand() -> None:
        a = torch.rand(view, device=real.device)
        x_hat = torch.lerp(real, fake, a).requires_grad_(True)
        out = critic(x_hat)
        (g,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
        gp = 10.0 * ((torch.linalg.vector_norm(g, dim=dims) - 1.0) ** 2).mean()
        gp.backward()
        critic.zero_grad(set_to_none=True)

    def gradlab() -> None:
        gradient_penalty(critic, real, fake).backward()
        critic.zero_grad(set_to_none=True)

    return {"hand-written (autograd.grad)": hand, "gradlab gradient_penalty": gradlab}


def _r1_steps(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """Critic steps with R1 computed exactly or by finite differences, with or without outputs=."""
    softplus = nn.functional.softplus
    gen = torch.Generator(device=real.device).manual_seed(0)

    def step(method: str, reuse: bool) -> Callable[[], None]:
        extra = {"sigma": 0.01, "generator": gen} if method == "finite-difference" else {}

        def run() -> None:
            if reuse:
                x = real.detach().requires_grad_(True) if method == "exact" else real
                d_real = critic(x)
                r1 = r1_penalty(critic, x, outputs=d_real, method=method, **extra)
            else:
                d_real = critic(real)
                r1 = r1_penalty(critic, real, method=method, **extra)
            loss = softplus(critic(fake)).mean() + softplus(-d_real).mean() + r1
            loss.backward()
            critic.zero_grad(set_to_none=True)

        return run

    def plain() -> None:
        loss = softplus(critic(fake)).mean() + softplus(-critic(real)).mean()
        loss.backward()
        critic.zero_grad(set_to_none=True)

    return {
        "exact": step("exact", False),
        "exact (outputs=)": step("exact", True),
        "finite-difference": step("finite-difference", False),
        "finite-difference (outputs=)": step("finite-difference", True),
        "no R1 (plain step)": plain,
    }


def run(ctx: Context) -> list[Table]:
    dev = ctx.device
    tables = []

    size = ctx.pick(32, 32, 64)
    batch = ctx.pick(4, 16, 64)
    width = ctx.pick(8, 32, 64)
    critic = _dcgan_critic(width, size).to(dev)
    real = torch.randn(batch, 3, size, size, device=dev)
    fake = torch.randn(batch, 3, size, size, device=dev)
    steps = _critic_steps(critic, real, fake)
    ctx.progress(f"penalty step cost: DCGAN critic {size}x{size} width {width} batch {batch}")
    timings, ratios = time_interleaved(steps, ctx=ctx, baseline="plain")
    t1 = Table(
        f"Critic training step with each penalty vs a plain step (DCGAN critic {size}x{size}, "
        f"width {width}, batch {batch})",
        ["penalty", "step_s", "iqr_s", "ratio_vs_plain"],
        notes=[
            "ratio_vs_plain: median over interleaved rounds of time(step) / time(plain step).",
            "lazy r1: 16 steps with R1 (gain 16) on the first, per step; ratio against 16 plain "
            "steps.",
        ],
    )
    for name in steps:
        if name.startswith("_"):
            continue
        t1.add(
            penalty=name,
            step_s=timings[name].median,
            iqr_s=timings[name].iqr,
            ratio_vs_plain=ratios[name],
        )
    lazy_ratio = ratios["_lazy r1 x16"] / ratios["_plain x16"]
    t1.add(
        penalty="lazy r1 (every 16), amortized",
        step_s=timings["_lazy r1 x16"].median / 16,
        iqr_s=timings["_lazy r1 x16"].iqr / 16,
        ratio_vs_plain=lazy_ratio,
    )
    gsteps = _generator_steps(batch, dev)
    ctx.progress("path length: generator step")
    gt, gr = time_interleaved(gsteps, ctx=ctx, baseline="plain")
    t1.add(
        penalty="path length (generator step)",
        step_s=gt["path length"].median,
        iqr_s=gt["path length"].iqr,
        ratio_vs_plain=gr["path length"],
    )
    t1.notes.append(
        "path length: a DCGAN-style generator 64 -> 3x32x32, plain step = a loss on its output; "
        f"plain generator step {gt['plain'].median * 1e3:.2f} ms."
    )
    tables.append(t1)

    cases = [
        ("Linear(3,2) b=4", nn.Linear(3, 2), (4, 3)),
        ("MLP 784-512-512-1 b=64", _mlp(), (64, 784)),
        (
            f"DCGAN critic {size}x{size} b={batch}",
            _dcgan_critic(width, size),
            (batch, 3, size, size),
        ),
    ]
    t2 = Table(
        "gradient_penalty vs the best hand-written GP (autograd.grad)",
        ["case", "variant", "median_s", "iqr_s", "ratio_vs_hand", "target"],
        notes=["ratio_vs_hand: median over interleaved rounds; target <= 1.03."],
    )
    for label, model, shape in cases:
        model = model.to(dev)
        r, f = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
        pair = _gp_pair(model, r, f)
        ctx.progress(f"gradient_penalty vs hand-written: {label}")
        timings, ratios = time_interleaved(pair, ctx=ctx, baseline="hand-written (autograd.grad)")
        for name in pair:
            t2.add(
                case=label,
                variant=name,
                median_s=timings[name].median,
                iqr_s=timings[name].iqr,
                ratio_vs_hand=ratios[name],
                target=None if name.startswith("hand") else judge(ratios[name], at_most=1.03),
            )
    tables.append(t2)

    t3 = Table(
        "R1 step: exact vs finite-difference, without and with outputs=",
        ["critic", "r1", "step_s", "iqr_s", "ratio_vs_exact"],
        notes=[
            "A full critic step (non-saturating loss on fake and real + R1, backward); "
            "ratio_vs_exact: median over interleaved rounds of time(step) / time(exact R1 step "
            "without outputs=). finite-difference: sigma=0.01, one extra forward, no double "
            "backward; outputs=: R1 reuses the adversarial forward on the reals.",
        ],
    )
    r1_cases = [
        (f"DCGAN {size}x{size} w{width} b{batch}", critic, (batch, 3, size, size)),
        ("MLP 784-512-512-1 b64", _mlp().to(dev), (64, 784)),
    ]
    for label, model, shape in r1_cases:
        r, f = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
        r1_steps = _r1_steps(model, r, f)
        ctx.progress(f"R1 exact vs finite-difference: {label}")
        timings, ratios = time_interleaved(r1_steps, ctx=ctx, baseline="exact")
        for name in r1_steps:
            t3.add(
                critic=label,
                r1=name,
                step_s=timings[name].median,
                iqr_s=timings[name].iqr,
                ratio_vs_exact=ratios[name],
            )
    tables.append(t3)
    return tables


SUITE = Suite(
    name="penalties",
    description=(
        "GAN penalties: step cost vs a plain critic step; gradient_penalty vs hand-written; "
        "R1 exact vs finite-difference"
    ),
    run=run,
    seconds={"quick": 8, "default": 39},
)
