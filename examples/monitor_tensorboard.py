"""Monitoring a training run into TensorBoard with gradlab.hooks.GradientMonitor.

A deep tanh MLP (where gradients vanish towards the input) is trained on a synthetic regression
task; a :class:`~gradlab.hooks.GradientMonitor` wraps the whole run and every step's
``monitor.scalars()`` (per-module output-gradient and per-parameter norms, the total norm, the
counts of vanishing/exploding/non-finite gradients) go to TensorBoard. At the end the last step is
printed as a table (:func:`~gradlab.hooks.grad_flow_table`). Then a NaN is planted in one layer's
backward and the monitor names the layer that made it.

Run ``python examples/monitor_tensorboard.py`` and ``tensorboard --logdir examples/out/runs``
(needs ``pip install tensorboard``), or call :func:`main` (the test suite does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from gradlab.hooks import GradientMonitor, grad_flow_table

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "runs"


class NaNInBackward(torch.autograd.Function):
    """Identity forward; its backward turns the gradient into NaN (a planted bug)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Broken(nn.Module):
    def forward(self, x):
        return NaNInBackward.apply(x)


def make_mlp(depth: int = 8, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def main(steps: int = 100, out: str | Path = DEFAULT_OUT, *, seed: int = 0) -> dict:
    """Train ``steps`` steps with TensorBoard logging; return the last scalars, the number of
    logged steps and the NaN source found in the planted-bug run."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    writer = SummaryWriter(str(out))
    with GradientMonitor(model) as monitor:
        for step in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            writer.add_scalar("loss", loss.item(), global_step=step)
            for key, value in monitor.scalars().items():
                writer.add_scalar(key, value, global_step=step)
            opt.step()
            opt.zero_grad()
    writer.close()
    print(grad_flow_table(monitor, kind="outputs"))
    last = monitor.scalars()

    # a planted NaN: which layer made it?
    broken = nn.Sequential(*list(make_mlp(depth=4))[:3], Broken(), *list(make_mlp(depth=4))[3:])
    with GradientMonitor(broken) as nan_monitor:
        nn.functional.mse_loss(broken(x), y).backward()
    source = nan_monitor.first_nonfinite
    print("first non-finite gradient made by:", source)
    return {"scalars": last, "steps": monitor.steps, "nan_source": source}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    main(parser.parse_args().steps)
