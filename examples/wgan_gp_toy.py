"""WGAN-GP on the 8-Gaussians toy task of Gulrajani et al. (2017), on the CPU.

The data is a mixture of 8 Gaussians (std 0.02) on a circle, generated in code as in the paper's
``gan_toy.py``. Generator and critic are ReLU MLPs; the critic is trained 5 times per generator
step with ``gradlab.penalties.gradient_penalty_and_norms`` (lambda = 10), which also hands back the
per-sample gradient norms, logged here without a second double-backward. At the end a figure with
the real and generated samples over the critic's contours is written to ``OUT/wgan_gp_toy.png``.

Run ``python examples/wgan_gp_toy.py`` (about a minute on 2 CPU cores; ``--steps`` to change) or
call :func:`main` (the test suite runs it for a few steps).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from gradlab.penalties import gradient_penalty_and_norms

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def eight_gaussians(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """``n`` samples of the paper's 8-Gaussians mixture (scale 2, std 0.02, divided by 1.414)."""
    angles = torch.arange(8) * (math.pi / 4)
    centers = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    idx = torch.randint(0, 8, (n,), generator=generator)
    noise = 0.02 * torch.randn(n, 2, generator=generator)
    return (centers[idx] + noise) / 1.414


def mlp(d_in: int, d_out: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, d_out),
    )


def plot(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, path: Path) -> None:
    """Real and generated samples over the critic's contours (matplotlib, imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 2.0
    xs = torch.linspace(-lim, lim, 121)
    grid = torch.cartesian_prod(xs, xs)
    with torch.no_grad():
        scores = critic(grid).view(121, 121).T
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.contourf(xs.numpy(), xs.numpy(), scores.numpy(), levels=30, cmap="viridis", alpha=0.8)
    ax.scatter(real[:, 0], real[:, 1], s=4, c="orange", label="real")
    ax.scatter(fake[:, 0], fake[:, 1], s=4, c="white", edgecolors="k", linewidths=0.2, label="G(z)")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title="WGAN-GP, 8 Gaussians: critic contours")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(
    steps: int = 1000,
    out: str | Path = DEFAULT_OUT,
    *,
    seed: int = 0,
    width: int = 128,
    batch: int = 256,
    critic_iters: int = 5,
    log_every: int = 250,
    threads: int | None = 1,
    lr: float = 1e-3,
    gp_weight: float = 0.1,
) -> dict[str, float]:
    """Train for ``steps`` generator steps and save the plot; return the last step's metrics.

    ``threads``: torch's intra-op threads during the run (restored afterwards). Networks this
    small run fastest on one thread; on a busy machine several threads are many times slower.

    Returns:
        ``{"critic_loss", "wasserstein", "gp", "grad_norm_mean", "grad_norm_max", "seconds"}`` of
        the last critic step (``wasserstein`` is the critic's estimate E[D(real)] - E[D(fake)]).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(steps, Path(out), seed, width, batch, critic_iters, log_every, lr, gp_weight)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    steps: int,
    out: Path,
    seed: int,
    width: int,
    batch: int,
    critic_iters: int,
    log_every: int,
    lr: float,
    gp_weight: float,
) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    gen, critic = mlp(2, 2, width), mlp(2, 1, width)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        for _ in range(critic_iters):
            real = eight_gaussians(batch, generator=rng)
            with torch.no_grad():
                fake = gen(torch.randn(batch, 2, generator=rng))
            d_real, d_fake = critic(real).mean(), critic(fake).mean()
            gp, norms = gradient_penalty_and_norms(
                critic, real, fake, weight=gp_weight, generator=rng
            )
            loss_d = d_fake - d_real + gp
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        loss_g = -critic(gen(torch.randn(batch, 2, generator=rng))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        metrics = {
            "critic_loss": loss_d.item(),
            "wasserstein": (d_real - d_fake).item(),
            "gp": gp.item(),
            "grad_norm_mean": norms.mean().item(),
            "grad_norm_max": norms.max().item(),
        }
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}  W-estimate {metrics['wasserstein']:.4f}  GP {metrics['gp']:.4f}"
                f"  ||grad D|| mean {metrics['grad_norm_mean']:.3f}"
                f" max {metrics['grad_norm_max']:.3f}"
            )
    metrics["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        samples = gen(torch.randn(1000, 2, generator=rng))
    plot(critic, eight_gaussians(1000, generator=rng), samples, out / "wgan_gp_toy.png")
    print(f"{steps} steps in {metrics['seconds']:.1f} s; plot: {out / 'wgan_gp_toy.png'}")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="generator steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, out=args.out, seed=args.seed)
