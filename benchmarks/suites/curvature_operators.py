"""curvature_operators: GGN products, KFAC construction and the exact GGN diagonal vs the peers.

Small models (an MLP and a strided CNN, cross-entropy, one thread), each quantity timed with its
peer in short alternating runs: the GGN matvec against curvlinops' ``GGNLinearOperator`` and one
gradient (forward + backward of the loss); KFAC construction for each Fisher type against
curvlinops' ``KFACLinearOperator``; the exact GGN diagonal against BackPACK's ``DiagGGNExact``;
``K.inverse(damping) @ v`` (inverting the factors and one product) against curvlinops'
``KFACInverseLinearOperator``. A peer that is not installed is left out, and its target rows say
so. Targets (issue 25): GGN matvec <= 1.0x curvlinops and <= 2.5x a gradient; KFAC
construction <= 1.0x curvlinops; exact GGN diagonal <= 1.0x BackPACK.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradlab as gl
from benchmarks._core import Context, Suite, Table, judge, time_alternating

FISHERS = ("type-2", "mc", "empirical")
DAMPING = 1e-3


def _problems(ctx: Context) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    dev = ctx.device
    hidden, width = ctx.pick(32, 64, 256), ctx.pick(4, 8, 16)
    batch = ctx.pick(16, 32, 128)
    mlp: nn.Module = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    cnn: nn.Module = nn.Sequential(
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


# One quantity: its variants, the peer its target is against (None: not installed), the targets.
Quantity = tuple[dict[str, Callable[[], object]], str, list[tuple[str, str, float]]]


def _quantities(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Quantity]:
    """Per quantity: ``(variants, peer, targets)``, each target ``(name, baseline, at_most)``."""
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, device=x.device)
    curvlinops = _peer("curvlinops")

    def gradient() -> object:
        return torch.autograd.grad(loss_fn(model(x), y), params)

    G = gl.ggn_operator(model, loss_fn, (x, y))
    ggn: dict[str, Callable[[], object]] = {"gradlab": lambda: G @ v, "one gradient": gradient}
    out: dict[str, Quantity] = {
        "GGN matvec": (
            ggn,
            "curvlinops",
            [
                ("<= 1.0x curvlinops", "curvlinops", 1.0),
                ("<= 2.5x a gradient", "one gradient", 2.5),
            ],
        )
    }
    if curvlinops is not None:
        C = curvlinops.GGNLinearOperator(
            model, loss_fn, params, [(x, y)], check_deterministic=False
        )
        ggn["curvlinops"] = lambda: C @ v
    for fisher in FISHERS:
        extra: dict[str, Any] = {"generator": 0} if fisher == "mc" else {}

        def ours_kfac(f: str = fisher, e: dict[str, Any] = extra) -> object:
            return gl.kfac_operator(model, loss_fn, (x, y), fisher=f, **e)

        kfac: dict[str, Callable[[], object]] = {"gradlab": ours_kfac}
        if curvlinops is not None:

            def peer_kfac(f: str = fisher) -> object:
                # without check_deterministic the factors are computed on demand: ask for them
                K = curvlinops.KFACLinearOperator(
                    model,
                    loss_fn,
                    params,
                    [(x, y)],
                    fisher_type=f,
                    check_deterministic=False,
                    **({"seed": 0} if f == "mc" else {}),
                )
                K.compute_kronecker_factors()
                return K

            kfac["curvlinops"] = peer_kfac
        out[f"KFAC construction ({fisher})"] = (
            kfac,
            "curvlinops",
            [("<= 1.0x curvlinops", "curvlinops", 1.0)],
        )
    K = gl.kfac_operator(model, loss_fn, (x, y))
    inverse: dict[str, Callable[[], object]] = {"gradlab": lambda: K.inverse(damping=DAMPING) @ v}
    if curvlinops is not None:
        CK = curvlinops.KFACLinearOperator(
            model, loss_fn, params, [(x, y)], fisher_type="type-2", check_deterministic=False
        )
        CK.compute_kronecker_factors()

        def peer_inverse() -> object:  # a fresh inverse: its factors are inverted on first use
            return curvlinops.KFACInverseLinearOperator(CK, damping=DAMPING) @ v

        inverse["curvlinops"] = peer_inverse
    out["KFAC inverse @ v (invert + 1 product)"] = (inverse, "curvlinops", [])
    diag: dict[str, Callable[[], object]] = {
        "gradlab": lambda: gl.ggn_diagonal(model, loss_fn, (x, y))
    }
    backpack_diag = _backpack_diagonal(model, x, y)
    if backpack_diag is not None:
        diag["BackPACK"] = backpack_diag
    out["exact GGN diagonal"] = (diag, "BackPACK", [("<= 1.0x BackPACK", "BackPACK", 1.0)])
    return out


def _peer(name: str) -> Any:
    """The peer module, or None where it is not installed."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _backpack_diagonal(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], object] | None:
    backpack = _peer("backpack")
    if backpack is None:
        return None
    from backpack.extensions import DiagGGNExact

    bp_model = backpack.extend(copy.deepcopy(model))
    bp_loss = backpack.extend(nn.CrossEntropyLoss())

    def run() -> object:
        with backpack.backpack(DiagGGNExact()):
            bp_loss(bp_model(x), y).backward()
        out = [p.diag_ggn_exact for p in bp_model.parameters()]
        bp_model.zero_grad(set_to_none=True)
        return out

    return run


def run(ctx: Context) -> list[Table]:
    times = Table(
        "GGN matvec, KFAC, exact GGN diagonal: gradlab vs curvlinops / BackPACK (one thread)",
        ["case", "quantity", "variant", "median_s", "iqr_s", "ratio_vs_gradlab"],
        notes=[
            "Each quantity's variants timed in short alternating runs (time_alternating), one "
            "torch thread. ratio_vs_gradlab: time / gradlab's time (above 1: gradlab is faster). "
            "curvlinops is timed on its own operators (check_deterministic=False); KFAC "
            "construction asks curvlinops for its factors (compute_kronecker_factors); 'KFAC "
            "inverse @ v' inverts the damped factors and applies them once (both libraries "
            "invert on the first product). A peer that is not installed has no row.",
        ],
    )
    targets = Table(
        "Targets (issue 25): gradlab's time / the baseline's",
        ["case", "quantity", "goal", "ratio", "target"],
        notes=[
            "ratio: median over alternating turns of time(gradlab) / time(baseline), with its "
            "spread; target: the verdict of benchmarks._core.judge (met / missed / "
            "inconclusive), or 'skipped' where the peer is not installed.",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for label, model, x, y in _problems(ctx):
            for quantity, (fns, peer, goals) in _quantities(model, x, y).items():
                ctx.progress(f"{quantity}: {label}")
                timings, ratios = time_alternating(
                    fns, ctx=ctx, baseline="gradlab", block=3, skip=1
                )
                for name in fns:
                    times.add(
                        case=label,
                        quantity=quantity,
                        variant=name,
                        median_s=timings[name].median,
                        iqr_s=timings[name].iqr,
                        ratio_vs_gradlab=ratios[name],
                    )
                for goal, baseline, at_most in goals:
                    if baseline not in fns:
                        targets.add(
                            case=label,
                            quantity=quantity,
                            goal=goal,
                            target=f"skipped: {peer} is not installed",
                        )
                        continue
                    ratio = 1 / ratios[baseline]  # time(gradlab) / time(baseline), per turn
                    targets.add(
                        case=label,
                        quantity=quantity,
                        goal=goal,
                        ratio=ratio,
                        target=judge(ratio, at_most=at_most),
                    )
    finally:
        torch.set_num_threads(threads)
    return [times, targets]


SUITE = Suite(
    name="curvature_operators",
    description="GGN matvec, KFAC construction and the exact GGN diagonal vs curvlinops/BackPACK",
    run=run,
    seconds={"quick": 8, "default": 37},  # quick: an estimate (12 s at load 5.6 on 2 CPUs)
)
