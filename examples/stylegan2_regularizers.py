"""A StyleGAN2-style training loop: R1 and path length regularisation, both lazy, on a toy GAN.

The generator maps latents ``w`` (B, 16) to 1x8x8 "images" made of a blurred random blob; the
critic is a small ConvNet. The critic step uses the logistic loss with R1 on the same forward pass
(``outputs=``), every ``r1_every`` steps, times ``r1_every`` (:class:`LazyRegularizer`); the
generator step uses the non-saturating loss with the path length penalty every ``pl_every`` steps
(:class:`PathLengthPenalty`, whose running mean lives in its ``state_dict``). Adam's learning rate
and betas are corrected for the lazy schedule as in StyleGAN2 (``adam_hyperparameters``).

Run ``python examples/stylegan2_regularizers.py`` (seconds on a CPU; ``--steps`` to change) or call
:func:`main` (the test suite runs it for a few steps).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.penalties import LazyRegularizer, PathLengthPenalty, r1_penalty


def real_images(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """``n`` 1x8x8 images of a Gaussian blob at a random position, in [-1, 1]."""
    centres = torch.rand(n, 2, generator=generator) * 6 + 1
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    d2 = ((grid[None] - centres[:, None, None]) ** 2).sum(-1)
    return (2 * torch.exp(-d2 / 4) - 1).unsqueeze(1)


def make_generator(w_dim: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Linear(w_dim, 64),
        nn.LeakyReLU(0.2),
        nn.Linear(64, 64),
        nn.Tanh(),
        nn.Unflatten(1, (1, 8, 8)),
    )


def make_critic() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 1),
    )


def main(
    steps: int = 300,
    *,
    batch: int = 32,
    r1_every: int = 16,
    pl_every: int = 4,
    gamma: float = 1.0,
    seed: int = 0,
    log_every: int = 50,
) -> dict[str, float]:
    """Train for ``steps`` steps; return the last step's losses, the R1 value of the last R1 step
    and the path length running mean."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed)
    G, D = make_generator(), make_critic()
    lazy_r1, lazy_pl = LazyRegularizer(every=r1_every), LazyRegularizer(every=pl_every)
    hp_d = lazy_r1.adam_hyperparameters(lr=2e-3, betas=(0.0, 0.99))
    hp_g = lazy_pl.adam_hyperparameters(lr=2e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=hp_d.lr, betas=hp_d.betas)
    opt_g = torch.optim.Adam(G.parameters(), lr=hp_g.lr, betas=hp_g.betas)
    path_length = PathLengthPenalty()
    metrics: dict[str, float] = {"r1": math.nan}
    for step in range(steps):
        # critic: logistic loss; R1 on the same forward pass of the real batch, every r1_every steps
        x = real_images(batch, generator=data).requires_grad_(True)
        d_real = D(x)
        d_fake = D(G(torch.randn(batch, 16)).detach())
        loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        if lazy_r1.is_due(step):
            r1 = r1_penalty(D, x, gamma=gamma, outputs=d_real)
            loss_d = loss_d + lazy_r1.gain * r1
            metrics["r1"] = r1.item()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # generator: non-saturating loss; path length every pl_every steps
        w = torch.randn(batch, 16, requires_grad=True)
        images = G(w)
        loss_g = F.softplus(-D(images)).mean()
        if lazy_pl.is_due(step):
            loss_g = loss_g + lazy_pl.gain * path_length(images, w)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        metrics.update(loss_d=loss_d.item(), loss_g=loss_g.item())
        if log_every and step % log_every == 0:
            print(
                f"step {step:4d}  D {loss_d.item():.3f}  G {loss_g.item():.3f}  "
                f"R1 {metrics['r1']:.4f}"
            )
    metrics["pl_mean"] = float(path_length.mean)
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(main(args.steps))
