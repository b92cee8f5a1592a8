"""Independent references for the penalty tests: critics, and the formulas written out by hand
with a per-sample loop of ``torch.autograd.grad`` (no gradlab code)."""

from __future__ import annotations

import torch
from torch import nn


class MLPCritic(nn.Sequential):
    def __init__(self, d: int = 6, h: int = 16) -> None:
        super().__init__(
            nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Softplus(), nn.Linear(h, 1)
        )


class ConvCritic(nn.Sequential):
    """A small conv critic on (B, 3, 8, 8) images, smooth activations, no normalisation."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Softplus(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 1),
        )


class ConditionalCritic(nn.Module):
    """Projection-discriminator style: score(x) + <embed(y), phi(x)>."""

    def __init__(self, d: int = 6, classes: int = 3, h: int = 8) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(d, h), nn.Tanh())
        self.out = nn.Linear(h, 1)
        self.embed = nn.Embedding(classes, h)

    def forward(self, x: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        f = self.phi(x)
        return self.out(f).squeeze(1) + (self.embed(labels) * f).sum(1)


class TwoInputCritic(nn.Module):
    """Image (B, 3, 8, 8) and a vector (B, 5): conv features concatenated with the vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * 4 * 4 + 5, 8), nn.Softplus(), nn.Linear(8, 1))

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(img), vec], dim=1))


def make_case(name: str, batch: int = 5, dtype=torch.float32, device="cpu"):
    """(critic, real, fake, critic_kwargs) for a named case; real/fake are tuples of inputs."""
    g = torch.Generator().manual_seed(123)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    kwargs: dict = {}
    if name == "mlp":
        critic, real, fake = MLPCritic(), (rnd(batch, 6),), (rnd(batch, 6),)
    elif name == "conv":
        critic, real, fake = ConvCritic(), (rnd(batch, 3, 8, 8),), (rnd(batch, 3, 8, 8),)
    elif name == "conditional":
        critic, real, fake = ConditionalCritic(), (rnd(batch, 6),), (rnd(batch, 6),)
        kwargs = {"labels": torch.randint(0, 3, (batch,), generator=g).to(device)}
    elif name == "two-input":
        critic = TwoInputCritic()
        real = (rnd(batch, 3, 8, 8), rnd(batch, 5))
        fake = (rnd(batch, 3, 8, 8), rnd(batch, 5))
    else:
        raise KeyError(name)
    return critic.to(dtype=dtype, device=device), real, fake, kwargs


CASES = ["mlp", "conv", "conditional", "two-input"]


def loop_grads(critic, xs: tuple[torch.Tensor, ...], kwargs: dict | None = None):
    """Per-sample input gradients, one forward and one autograd.grad per sample, with graph."""
    kwargs = kwargs or {}
    out = []
    for i in range(xs[0].shape[0]):
        xi = tuple(x[i : i + 1].detach().clone().requires_grad_(True) for x in xs)
        kw = {k: v[i : i + 1] for k, v in kwargs.items()}
        score = critic(*xi, **kw).sum()
        out.append(torch.autograd.grad(score, xi, create_graph=True))
    return out


def loop_sq_norms(critic, xs, kwargs=None) -> torch.Tensor:
    """Per-sample squared norms: sum over every input of sum(g**2)."""
    return torch.stack([sum((g**2).sum() for g in gs) for gs in loop_grads(critic, xs, kwargs)])


def loop_norms(critic, xs, kwargs=None) -> torch.Tensor:
    return loop_sq_norms(critic, xs, kwargs).sqrt()


def hand_interpolate(real, fake, seed: int):
    """x_hat = real + a (fake - real), a ~ U[0,1) per sample drawn as documented."""
    a = torch.rand(
        real[0].shape[0], dtype=real[0].dtype, generator=torch.Generator().manual_seed(seed)
    )
    a = a.to(real[0].device)
    return tuple(r + a.view(-1, *[1] * (r.ndim - 1)) * (f - r) for r, f in zip(real, fake))


def hand_gp(critic, x_hat, kwargs=None, *, weight=10.0, center=1.0, one_sided=False):
    dev = loop_norms(critic, x_hat, kwargs) - center
    if one_sided:
        dev = dev.clamp(min=0)
    return weight * (dev**2).mean()
