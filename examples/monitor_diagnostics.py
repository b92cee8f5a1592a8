"""Training diagnostics with GradientMonitor: log them to TensorBoard and save the dashboard.

A small CNN learns a synthetic 4-class task (each class a noisy oriented stripe pattern on 12x12
images) with Adam. The monitor computes the economy set of diagnostics (gradient noise scale,
GSNR, the norm / inner-product / orthogonality tests, update size, distance from the start), the
per-sample loss statistics and the step-size quality alpha (from the losses handed over with
``record_loss``) on every ``--every``-th step; each step's statistics and diagnostics go to
TensorBoard (when ``tensorboard`` is installed: ``tensorboard --logdir OUT/tb``) with gradient
element histograms binned by the monitor, and at the end the dashboard
``plot_diagnostics(monitor)`` is written to ``OUT/monitor_diagnostics.png``.

Run ``python examples/monitor_diagnostics.py`` (a few seconds on a CPU; ``--steps``, ``--every``)
or call :func:`main` (the test suite runs it for a few steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from gradlab.hooks import GradientMonitor, plot_diagnostics, write_tensorboard

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
ECONOMY = (
    "noise_scale",
    "gsnr",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
    "update_size",
    "distance",
)
LOSSES = ("loss_mean", "loss_var", "alpha")  # from monitor.record_loss(per-sample losses)


def stripes(n: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1x12x12 images of 4 classes (stripe orientations) with noise, and their labels."""
    y = torch.randint(0, 4, (n,), generator=generator)
    i, j = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    patterns = torch.stack([torch.sin(i), torch.sin(j), torch.sin(i + j), torch.sin(i - j)])
    x = 0.5 * patterns[y] + 2.0 * torch.randn(n, 12, 12, generator=generator)
    return x.unsqueeze(1), y


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 4),
    )


def main(steps: int = 100, every: int = 4, batch: int = 32, out: Path = DEFAULT_OUT) -> Path:
    """Train, log and draw; returns the path of the dashboard PNG."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    out.mkdir(parents=True, exist_ok=True)
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    except ImportError:  # tensorboard is optional: the dashboard is still drawn
        writer = None
    # ema: the noise scale's numerator and denominator are averaged over the diagnostic steps
    with GradientMonitor(
        net, diagnostics=ECONOMY + LOSSES, every=every, ema=0.9, histogram_bins=64
    ) as monitor:
        for step in range(steps):
            x, y = stripes(batch, generator=gen)
            opt.zero_grad()
            losses = nn.functional.cross_entropy(net(x), y, reduction="none")  # (B,)
            monitor.record_loss(losses)
            loss = losses.mean()
            loss.backward()
            opt.step()
            if writer is not None and step % every == 0:
                write_tensorboard(writer, monitor)  # alpha of the step before: written now
                writer.add_scalar("loss", loss.item(), step)
    if writer is not None:
        writer.close()
    path = out / "monitor_diagnostics.png"
    plot_diagnostics(monitor).savefig(path, dpi=90)
    last = monitor.history[-1 - (steps - 1) % every].diagnostics
    print(f"loss {loss.item():.3f}; " + ", ".join(f"{k} {v:.3g}" for k, v in last.items()))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    print("dashboard:", main(args.steps, args.every, out=args.out))
