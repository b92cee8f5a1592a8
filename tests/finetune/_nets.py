"""Small models for the freeze tests, built in code (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus a (downsampling) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class TinyResNet(nn.Module):
    """torchvision-style names: conv1, bn1, layer1.0, layer1.1, layer2.0, layer2.1, fc."""

    def __init__(self, num_classes: int = 5, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


class TiedLM(nn.Module):
    """Embedding tied with the output layer (one tensor, two names)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.tanh(self.body(self.embed(tokens)))))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (tied names included)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def images(device: torch.device | str = "cpu", n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, device=device)
