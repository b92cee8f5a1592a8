"""The curvature of a trained model's loss: Hessian trace, top eigenvalues, spectrum, diagonal.

Trains a small MLP classifier on a synthetic dataset (two interleaved spirals), then measures the
curvature of the training loss over the whole dataset (``data=``, batch by batch) with
:mod:`gradlab.curvature`: the exact trace and a Hutch++ estimate, the top eigenvalues (Lanczos),
the spectral density (stochastic Lanczos quadrature) and the exact diagonal per layer. A sharp
minimum has a large top eigenvalue; a well-conditioned one a narrow spectrum.

Run ``python examples/curvature_of_a_trained_model.py`` (seconds on a CPU) or call :func:`main`.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import gradlab as gl


def spirals(n: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of two interleaved spirals in 2-D, labels 0/1."""
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([t * torch.cos(t) * sign, t * torch.sin(t) * sign], 1) / 10
    return x + 0.02 * torch.randn(n, 2, generator=generator), label


def main(
    epochs: int = 200, *, n: int = 512, width: int = 32, seed: int = 0, verbose: bool = True
) -> dict[str, object]:
    """Train, then return the curvature figures (``trace``, ``trace_hutchpp``, ``top``,
    ``diagonal``, ``spectrum``) and the ``model`` and ``batches`` they were measured on."""
    torch.manual_seed(seed)
    x, y = spirals(n, generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(
        nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()

    batches = list(zip(x.split(128), y.split(128)))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    out: dict[str, object] = {"accuracy": accuracy, "model": model, "batches": batches}
    out["trace"] = gl.hessian_trace(loss_fn, model, data=batches, method="exact")
    out["trace_hutchpp"] = gl.hessian_trace(
        loss_fn, model, data=batches, samples=60, method="hutch++", generator=0
    )
    out["top"] = gl.hessian_eigenvalues(loss_fn, model, data=batches, k=3).values
    out["diagonal"] = gl.hessian_diagonal(loss_fn, model, data=batches, method="exact")
    out["spectrum"] = gl.hessian_spectrum(
        loss_fn, model, data=batches, probes=2, steps=30, generator=0
    )
    if verbose:
        print(f"accuracy {accuracy:.3f}")
        print(
            f"trace: exact {float(out['trace']):.4f}, "
            f"Hutch++ (60 products) {float(out['trace_hutchpp']):.4f}"
        )
        print("top eigenvalues", [round(v, 4) for v in out["top"].tolist()])
        for name, d in out["diagonal"].items():
            print(f"  {name:10s} diagonal sum {d.sum().item():+.4f}  max {d.max().item():.4f}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    main(parser.parse_args().epochs)
