"""curvature_diagonal: the exact Hessian diagonal of MLP and CNN losses, three ways, side by side.

* ``Hessian backprop``: ``gl.hessian_diagonal(loss_fn, model, method="exact")``, which takes the
  Hessian-backpropagation fast path for these models (``gradlab.curvature._backprop``);
* ``BackPACK DiagHessian``: ``backpack-for-pytorch``'s exact diagonal (``extend`` the model and
  the loss, ``loss.backward()`` under ``backpack(DiagHessian())``), on its own copy of the model
  with the same weights; skipped cleanly where BackPACK is not installed (the ``bench`` extra);
* ``HVP exact``: gradlab's Hessian-vector-product method (``n`` products on unit vectors,
  batched), reached through the public API with the loss plus ``0 * sum(p.sum())``: a parameter
  used outside the network, which the fast path declines, and which adds nothing to the Hessian.
  Timed on the first MLP (and on every MLP up to 10k parameters with ``--full``): it costs n
  products, seconds per call.

Cases: MLPs with ReLU, sigmoid and tanh; CNNs with stride and padding, with max and average
pooling, and three convolutions with max and adaptive average pooling (ReLU; sigmoid too with
``--full``). Target: Hessian backprop <= 1.0x BackPACK on every case (the ``target`` column;
none where BackPACK is absent).

Each case is timed with ``time_alternating`` (single calls alternated, so the machine's drift
cancels out of the ratios), on one thread (restored afterwards); the HVP method, seconds per
call, with ``time_interleaved`` and one call per round. ``max_rel_diff``: the largest entry-wise
difference to BackPACK's diagonal (or to Hessian backprop's), over the largest entry.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradlab as gl
from benchmarks._core import Context, Suite, Table, judge, time_alternating, time_interleaved

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
_HVP_MAX_PARAMS = 10_000
_TARGET = 1.0  # Hessian backprop / BackPACK DiagHessian, every case (issue 25)


def _mlp(widths: list[int], act: type[nn.Module]) -> tuple[nn.Sequential, tuple[int, ...], str]:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]), (widths[0],), "MLP " + "-".join(map(str, widths))


def _cnn(act: type[nn.Module]) -> tuple[nn.Sequential, tuple[int, ...], str]:
    """3x16x16 images: conv 3->8 (3x3, pad 1), conv 8->8 (3x3, stride 2), flatten, linear -> 10."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        act(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        act(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    return net, (3, 16, 16), "CNN 3x16x16-c8-c8s2-10"


def _cnn_pool(act: type[nn.Module]) -> tuple[nn.Sequential, tuple[int, ...], str]:
    """3x16x16 images: conv 3->8 (3x3, pad 1), max pool 2, conv 8->16 (3x3, stride 2, pad 1),
    average pool 2, flatten, linear -> 10."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        act(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )
    return net, (3, 16, 16), "CNN 3x16x16-c8-maxpool-c16s2-avgpool-10"


def _cnn_deep(act: type[nn.Module]) -> tuple[nn.Sequential, tuple[int, ...], str]:
    """3x32x32 images, the ``curvature`` suite's CNN at width 8: three padded 3x3 convs with max
    pooling and an adaptive average pooling, a two-layer head."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1),
        act(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(24 * 16, 44),
        act(),
        nn.Linear(44, 10),
    )
    return net, (3, 32, 32), "CNN 3x32x32-c8-mp-c16-mp-c24-aap4-44-10"


def _backpack_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], list[torch.Tensor]] | None:
    try:
        import backpack
        from backpack.extensions import DiagHessian
    except ImportError:  # not installed: the column is left out
        return None

    ext = backpack.extend(copy.deepcopy(model))
    lossfunc = backpack.extend(nn.CrossEntropyLoss())
    params = list(ext.parameters())

    def run() -> list[torch.Tensor]:
        loss = lossfunc(ext(x), y)
        with backpack.backpack(DiagHessian()):
            loss.backward()
        out = [p.diag_h for p in params]  # type: ignore[attr-defined]
        for p in params:
            p.grad = None
        return out

    return run


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(t.abs().max().item() for t in b)
    return max((u - v).abs().max().item() for u, v in zip(a, b)) / scale


def _case(
    ctx: Context,
    table: Table,
    net: tuple[nn.Sequential, tuple[int, ...], str],
    act: str,
    batch: int,
    hvp: bool,
    summary: list[str],
) -> None:
    dev = ctx.device
    model, shape, name = net
    model = model.to(dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    n = sum(p.numel() for p in model.parameters())
    label = f"{name} {act} ({n:,} params, batch {batch})"
    ctx.progress(label)

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def backprop() -> list[torch.Tensor]:
        return list(gl.hessian_diagonal(loss_fn, model, method="exact").values())

    fns: dict[str, Callable[[], object]] = {"Hessian backprop": backprop}
    bp = _backpack_fn(model, x, y)
    if bp is not None:
        fns["BackPACK DiagHessian"] = bp
    with warnings.catch_warnings():  # BackPACK's full backward hooks warn on every call
        warnings.simplefilter("ignore", UserWarning)
        ours = backprop()
        ref = bp() if bp is not None else ours
        timings, ratios = time_alternating(fns, ctx=ctx, baseline=next(reversed(fns)))
    rows = {name: timings[name].median for name in fns}
    diffs = {name: _max_rel_diff(ours if name == "Hessian backprop" else ref, ref) for name in fns}
    if hvp:
        params = list(model.parameters())

        def hvp_loss() -> torch.Tensor:
            return loss_fn() + 0 * sum(p.sum() for p in params)

        def hvp_exact() -> list[torch.Tensor]:
            return list(gl.hessian_diagonal(hvp_loss, model, method="exact").values())

        slow = hvp_exact()
        t_hvp, r_hvp = time_interleaved(
            {"Hessian backprop": backprop, "HVP exact": hvp_exact},
            ctx=dataclasses.replace(ctx, size="quick"),
            number=1,
            rounds=2,
        )
        rows["HVP exact"] = t_hvp["HVP exact"].median
        diffs["HVP exact"] = _max_rel_diff(slow, ref)
        hvp_over_backprop = r_hvp["HVP exact"]
    for name, median in rows.items():
        if name == "HVP exact":
            vs_backprop = hvp_over_backprop
            vs_backpack = hvp_over_backprop * ratios["Hessian backprop"] if bp else None
        else:
            # its own row: exactly 1 (a plain number, so that the target row's one spread is
            # the ratio to BackPACK the verdict is about)
            vs_backprop = (
                1.0 if name == "Hessian backprop" else ratios[name] / ratios["Hessian backprop"]
            )
            vs_backpack = ratios[name] if bp else None
        target = None
        if name == "Hessian backprop" and vs_backpack is not None:
            target = judge(vs_backpack, at_most=_TARGET)
        table.add(
            case=label,
            variant=name,
            median_s=median,
            ratio_to_backpack=vs_backpack,
            ratio_to_backprop=vs_backprop,
            max_rel_diff=diffs[name],
            target=target,
        )
    if bp is not None:
        summary.append(f"{label}: {ratios['Hessian backprop']:.2f}x BackPACK")


def run(ctx: Context) -> list[Table]:
    table = Table(
        "Exact Hessian diagonal of a cross-entropy loss (mean over the batch)",
        [
            "case",
            "variant",
            "median_s",
            "ratio_to_backpack",
            "ratio_to_backprop",
            "max_rel_diff",
            "target",
        ],
        notes=[
            f"ratio_to_backpack: time / BackPACK DiagHessian's time (target <= {_TARGET:.1f}x for "
            "Hessian backprop on every case; '-' and no target row where BackPACK is not "
            "installed). ratio_to_backprop: time / Hessian backprop's time.",
            "One thread. BackPACK's time includes the gradient its backward pass also computes.",
        ],
    )
    mlps = ctx.pick(
        [[20, 32, 10]],
        [[10, 32, 32, 10], [20, 50, 50, 10], [784, 8, 10]],
        [[10, 32, 32, 10], [20, 50, 50, 10], [784, 8, 10], [100, 256, 256, 10]],
    )
    acts = ctx.pick(["relu", "sigmoid"], ["relu", "sigmoid", "tanh"], ["relu", "sigmoid", "tanh"])
    batch = ctx.pick(32, 128, 128)
    # (network, activation, batch, time the HVP method too)
    cases: list[tuple[Callable[[], tuple[nn.Sequential, tuple[int, ...], str]], str, int, bool]]
    cases = [
        (lambda w=w, a=a: _mlp(w, _ACTIVATIONS[a]), a, batch, i == 0 or ctx.size == "full")
        for i, w in enumerate(mlps)
        for a in acts
    ]
    # CNNs: stride and padding; max and average pooling; three convolutions with max and
    # adaptive average pooling. Sigmoid CNNs only with --full: BackPACK takes seconds per call
    # there (its residual factors grow by one column per pixel)
    cases += [
        (lambda: _cnn(nn.ReLU), "relu", ctx.pick(8, 32, 32), False),
        (lambda: _cnn_pool(nn.ReLU), "relu", ctx.pick(8, 32, 32), False),
    ]
    if ctx.size != "quick":
        cases.append((lambda: _cnn_deep(nn.ReLU), "relu", 16, False))
    if ctx.size == "full":
        cases += [
            (lambda: _cnn(nn.Sigmoid), "sigmoid", 8, False),
            (lambda: _cnn_pool(nn.Sigmoid), "sigmoid", 8, False),
        ]
    summary: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for build, act, size, hvp in cases:
            torch.manual_seed(0)
            net = build()
            hvp = hvp and sum(p.numel() for p in net[0].parameters()) <= _HVP_MAX_PARAMS
            _case(ctx, table, net, act, size, hvp, summary)
    finally:
        torch.set_num_threads(threads)
    table.notes.extend(summary)
    return [table]


SUITE = Suite(
    name="curvature_diagonal",
    description="exact Hessian diagonal: Hessian backprop vs BackPACK DiagHessian vs HVPs",
    run=run,
    seconds={"quick": 2, "default": 31},
)
