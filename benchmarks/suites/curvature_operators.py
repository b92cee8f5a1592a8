"""curvature_operators: GGN products, KFAC construction and the exact GGN diagonal vs the peers.

One table, small models (an MLP and a CNN, cross-entropy): per case, gradlab's variant against
the peer library's where it is installed (curvlinops ``GGNLinearOperator`` /
``KFACLinearOperator``, BackPACK ``DiagGGNExact``), and one gradient (forward + backward) for
scale. Targets (issue 25): GGN matvec <= 1.0x curvlinops and <= 2.5x a gradient; KFAC
construction <= 1.0x curvlinops; exact GGN diagonal <= 1.0x BackPACK.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

import gradlab as gl
from benchmarks._core import Context, Suite, Table, judge, time_interleaved


def _problems(ctx: Context) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    dev = ctx.device
    hidden, width = ctx.pick(32, 64, 256), ctx.pick(4, 8, 16)
    batch = ctx.pick(16, 32, 128)
    mlp = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 64, 10),
    )
    out = []
    for label, model, x in (
        (f"MLP 784-{hidden}-10", mlp, torch.randn(batch, 784)),
        (f"CNN width {width}", cnn, torch.randn(batch, 3, 32, 32)),
    ):
        n = sum(p.numel() for p in model.parameters())
        y = torch.randint(0, 10, (batch,))
        out.append((f"{label} ({n:,} params, batch {batch})", model.to(dev), x.to(dev), y.to(dev)))
    return out


def _variants(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, dict[str, Callable[[], object]]]:
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, device=x.device)

    def gradient() -> object:
        return torch.autograd.grad(loss_fn(model(x), y), params)

    G = gl.ggn_operator(model, loss_fn, (x, y))
    cases: dict[str, dict[str, Callable[[], object]]] = {
        "GGN matvec": {"gradlab": lambda: G @ v, "one gradient": gradient},
        "KFAC construction": {
            "gradlab": lambda: gl.kfac_operator(model, loss_fn, (x, y)),
            "one gradient": gradient,
        },
        "exact GGN diagonal": {
            "gradlab": lambda: gl.ggn_diagonal(model, loss_fn, (x, y)),
            "one gradient": gradient,
        },
    }
    if importlib.util.find_spec("curvlinops") is not None:
        import curvlinops

        C = curvlinops.GGNLinearOperator(
            model, loss_fn, params, [(x, y)], check_deterministic=False
        )
        cases["GGN matvec"]["curvlinops"] = lambda: C @ v

        def curvlinops_kfac() -> object:
            # without check_deterministic the factors are computed on demand: ask for them
            K = curvlinops.KFACLinearOperator(
                model, loss_fn, params, [(x, y)], fisher_type="type-2", check_deterministic=False
            )
            K.compute_kronecker_factors()
            return K

        cases["KFAC construction"]["curvlinops"] = curvlinops_kfac
    if importlib.util.find_spec("backpack") is not None:
        import backpack
        from backpack.extensions import DiagGGNExact

        bp_model = backpack.extend(copy.deepcopy(model))
        bp_loss = backpack.extend(nn.CrossEntropyLoss())

        def backpack_diag() -> object:
            with backpack.backpack(DiagGGNExact()):
                bp_loss(bp_model(x), y).backward()
            out = [p.diag_ggn_exact for p in bp_model.parameters()]
            bp_model.zero_grad(set_to_none=True)
            return out

        cases["exact GGN diagonal"]["backpack"] = backpack_diag
    return cases


def run(ctx: Context) -> list[Table]:
    t = Table(
        "GGN matvec, KFAC construction, exact GGN diagonal: gradlab vs curvlinops / BackPACK",
        ["case", "quantity", "variant", "median_s", "iqr_s", "ratio_vs_peer", "target"],
        notes=[
            "ratio_vs_peer: median over interleaved rounds of time / time(peer) (curvlinops for "
            "the GGN and KFAC, BackPACK for the diagonal), or / time(one gradient) when the peer "
            "is not installed. Targets: GGN matvec <= 1.0x curvlinops and <= 2.5x a gradient; "
            "KFAC <= 1.0x curvlinops; diagonal <= 1.0x BackPACK.",
        ],
    )
    for label, model, x, y in _problems(ctx):
        for quantity, fns in _variants(model, x, y).items():
            ctx.progress(f"{quantity}: {label}")
            peer = next((k for k in ("curvlinops", "backpack") if k in fns), "one gradient")
            timings, ratios = time_interleaved(fns, ctx=ctx, baseline=peer)
            for name in fns:
                target = None
                if name == "gradlab" and peer != "one gradient":
                    target = judge(ratios[name], at_most=1.0)
                elif name == "gradlab" and quantity == "GGN matvec":
                    target = judge(ratios[name], at_most=2.5)
                t.add(
                    case=label,
                    quantity=quantity,
                    variant=name,
                    median_s=timings[name].median,
                    iqr_s=timings[name].iqr,
                    ratio_vs_peer=ratios[name],
                    target=target,
                )
    return [t]


SUITE = Suite(
    name="curvature_operators",
    description="GGN matvec, KFAC construction and the exact GGN diagonal vs curvlinops/BackPACK",
    run=run,
    seconds={"quick": 3},
)
