"""Fine-tuning a "pretrained" network with gradlab.finetune: freeze, new head, gradual unfreezing.

A small ConvNet with BatchNorm is first trained on one synthetic task (classify which quadrant of
a 12x12 image holds a bright square), then fine-tuned on a new task (which of 3 shapes): the
backbone is frozen (``gl.freeze``: ``requires_grad=False``, ``.grad = None``, BatchNorm pinned in
eval mode), the head replaced (``gl.replace_module``), the optimizer built over the trainable
parameters only, and the backbone's last block unfrozen after the first epoch with a smaller
learning rate (``gl.GradualUnfreezing``, which also extends the cosine schedule to the new group).
The still-frozen first block, its BatchNorm statistics included, stays bit-identical throughout,
although the loop calls ``zero_grad(set_to_none=False)`` and Adam with weight decay.

Run ``python examples/finetune_with_freezing.py`` (seconds on a CPU) or call :func:`main`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gradlab as gl


def images(n: int, task: str, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 1x12x12 images and labels: ``"quadrant"`` (4 classes) or ``"shape"`` (3)."""
    x = 0.3 * torch.randn(n, 1, 12, 12, generator=generator)
    if task == "quadrant":
        y = torch.randint(0, 4, (n,), generator=generator)
        for i, q in enumerate(y.tolist()):
            r, c = 6 * (q // 2) + 1, 6 * (q % 2) + 1
            x[i, 0, r : r + 4, c : c + 4] += 1.0
    else:
        y = torch.randint(0, 3, (n,), generator=generator)
        for i, s in enumerate(y.tolist()):
            if s == 0:
                x[i, 0, 3:9, 5:7] += 1.0  # vertical bar
            elif s == 1:
                x[i, 0, 5:7, 3:9] += 1.0  # horizontal bar
            else:
                x[i, 0, 4:8, 4:8] += 1.0  # square
    return x, y


def make_net(classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)
        ),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, classes),
    )


def train(net, opt, data, epochs, *, sched=None, unfreezer=None):
    net.train()
    for _ in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        if unfreezer is not None:
            unfreezer.step()
    return loss.item()


def accuracy(net, data) -> float:
    net.eval()
    with torch.no_grad():
        hits = sum((net(x).argmax(1) == y).sum().item() for x, y in data)
    return hits / sum(len(y) for _, y in data)


def main(*, pretrain_epochs: int = 5, epochs: int = 4, n: int = 512, seed: int = 0) -> dict:
    """Pretrain, fine-tune; return accuracies and whether the frozen block stayed identical."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pre = list(zip(*(t.split(64) for t in images(n, "quadrant", generator=g))))
    new = list(zip(*(t.split(64) for t in images(n, "shape", generator=g))))

    net = make_net(4)
    train(net, torch.optim.Adam(net.parameters(), lr=1e-2), pre, pretrain_epochs)
    pretrain_acc = accuracy(net, pre)

    gl.freeze(net)  # the whole pretrained network
    gl.replace_module(net, "3", nn.Linear(16 * 3 * 3, 3))  # a new head, trainable
    opt = torch.optim.AdamW(gl.trainable_parameters(net), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    unfreezer = gl.GradualUnfreezing(net, opt, ["1"], lr=1e-3, scheduler=sched)
    first_block = {k: v.clone() for k, v in net[0].state_dict().items()}
    print(gl.parameter_summary(net))

    loss = train(net, opt, new, epochs, sched=sched, unfreezer=unfreezer)
    unchanged = all(torch.equal(first_block[k], v) for k, v in net[0].state_dict().items())
    out = {
        "pretrain_accuracy": pretrain_acc,
        "finetune_accuracy": accuracy(net, new),
        "loss": loss,
        "frozen_block_unchanged": unchanged,
        "param_groups": len(opt.param_groups),
    }
    print(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    main(epochs=parser.parse_args().epochs)
