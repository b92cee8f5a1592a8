"""derivatives: every strategy of gradlab's derivative functions, "auto", and torch's own functions.

Each row times one way of computing the same derivative, alternating call by call with the others
of its case (``benchmarks._core.time_alternating``, ``block=2, skip=1``: each recorded call follows
a call of the same variant); ``ratio_to_best`` is the median per-turn time ratio to the fastest
variant of the case, so that the machine's drift cancels out of it (on CUDA: interleaved blocks).
Cases (the matrix of issue 3):

* Hessian of a 2-layer tanh network ``sum(W2 tanh(W1 x + b1))`` with n inputs, written with
  ``F.linear`` and with ``W @ x``;
* Jacobians 512 -> 16 and 16 -> 512 of ``tanh(W x)``;
* HVP of an MLP (784-128-10) cross-entropy loss w.r.t. its ~100k parameters at batch 64 and 512;
* k-th derivative of ``tanh`` (elementwise) for k = 1..8: cost per strategy and growth per order;
* thin wrappers, one thread: ``gl.grad`` against ``torch.autograd.grad`` on an overhead-bound MLP
  (target <= 1.10x) and ``gl.hvp`` against the same double backward written out, at 101,770 and
  1,009,660 parameters (target <= 1.05x).

The strategies timed are the registries' (``gradlab._derivatives.OPERATIONS``), so a new strategy
appears here without touching this file. ``auto`` is timed after its measurement (the first call
and its trials, run before timing), i.e. at its steady-state cost: key, cache look-up and the chosen
strategy. ``heuristic`` is ``auto`` with measurement off (``gl.autotune(False)``): the documented
heuristic at the same look-up cost. The summary table gives ``auto/best`` and ``heuristic/best`` per
case (targets: <= 1.1x and <= 1.5x on an idle machine), best being the fastest other variant,
measured again with auto and heuristic alone.
Its ``first_call_ratio`` (target <= 3x) is a key's first ``auto`` call over a steady one, and
``worst_trial_call_ratio`` the slowest of the calls after it that try the challengers the first
call did not run (``help(gradlab.autotune)``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradlab as gl
from benchmarks._core import Context, Suite, Table, judge, time_alternating
from gradlab._derivatives import OPERATIONS, _autotune

# Variants that are references, not ways of computing the derivative (not counted as "best").
_REFERENCE = ("gradient (reference)",)


def _rows(
    table: Table,
    case: str,
    fns: dict[str, Callable[[], object]],
    ctx: Context,
    *,
    rounds: int | None = None,
    extra: dict[str, dict[str, float]] | None = None,
) -> dict[str, float]:
    _settle(fns)
    timings, ratios = time_alternating(fns, ctx=ctx, rounds=rounds, block=2, skip=1)
    best = min(r for n, r in ratios.items() if n not in _REFERENCE)
    out = {}
    for name in fns:
        row = {
            "case": case,
            "variant": name,
            "median_s": timings[name].median,
            "ratio_to_best": ratios[name] / best,
        }
        if extra and name in extra:
            row.update(extra[name])
        table.add(**row)
        out[name] = ratios[name] / best
    return out


def _settle(
    fns: dict[str, Callable[[], object]], sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Bring ``auto`` to its steady state: the first call, then the trials' calls if any (one
    trial per challenger, each at most ``2 * _TRIAL_PAIRS`` calls). Returns the time of each
    call after the first."""
    times: list[float] = []
    if "auto" in fns:
        fns["auto"]()
        for _ in range(2 * _autotune._TRIAL_PAIRS * 8):
            if not any(e.trial is not None for e in list(_autotune._CACHE.values())):
                break
            sync()
            t0 = time.perf_counter()
            fns["auto"]()
            sync()
            times.append(time.perf_counter() - t0)
    return times


def _first_call_ratio(fns: dict[str, Callable[[], object]], ctx: Context) -> tuple[float, float]:
    """Medians over rounds of (first ``auto`` call of a fresh cache) / (a steady ``auto`` call)
    and of (the slowest of the trials' calls that follow it) / (a steady call).

    The process is warm (every variant ran before); only the autotune cache is cleared, so the
    first call pays the measurement and nothing else. Steady: the median of 5 calls after the
    trials' calls.
    """
    auto = fns["auto"]

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    ratios, later = [], []
    for _ in range(ctx.rounds):
        gl.clear_autotune_cache()
        sync()
        t0 = time.perf_counter()
        auto()
        sync()
        first = time.perf_counter() - t0
        trials = _settle({"auto": auto}, sync)
        steady = []
        for _ in range(5):
            t0 = time.perf_counter()
            auto()
            sync()
            steady.append(time.perf_counter() - t0)
        ratios.append(first / statistics.median(steady))
        later.append(max(trials, default=0.0) / statistics.median(steady))
    return statistics.median(ratios), statistics.median(later)


def _versus_best(
    fns: dict[str, Callable[[], object]], ratios: dict[str, float], ctx: Context
) -> tuple[str, dict[str, float]]:
    """The fastest variant other than auto/heuristic, and auto's and heuristic's ratios to it.

    Measured again, the three alone (see the summary table's note).
    """
    others = [n for n in ratios if n not in ("auto", "heuristic", *_REFERENCE)]
    best = min(others, key=lambda n: ratios[n])
    trio = {best: fns[best], "auto": fns["auto"], "heuristic": fns["heuristic"]}
    short = dataclasses.replace(ctx, size="quick")  # short runs, as many rounds as the table
    _, focused = time_alternating(
        trio, ctx=short, baseline=best, rounds=ctx.rounds, block=9, skip=1
    )
    return best, focused


def _strategies(op: str, call: Callable[[str], object]) -> dict[str, Callable[[], object]]:
    """Every registered strategy of ``op``, ``auto``, and ``heuristic`` (auto, measurement off)."""
    fns: dict[str, Callable[[], object]] = {s: (lambda s=s: call(s)) for s in OPERATIONS[op].names}
    fns["auto"] = lambda: call("auto")

    def heuristic() -> object:
        with gl.autotune(False):
            return call("auto")

    fns["heuristic"] = heuristic
    return fns


def _choice(op: str) -> tuple[str, str]:
    """(auto's cached choice, the heuristic) of the most recent key of ``op``."""
    entries = [e for k, e in list(_autotune._CACHE.items()) if k[0] == op]
    if not entries:
        return "-", "-"
    return entries[-1].choice or entries[-1].heuristic, entries[-1].heuristic


def _tanh_net(n: int, hidden: int, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    W1 = (torch.randn(hidden, n, generator=g) / n**0.5).to(dev)
    b1 = torch.randn(hidden, generator=g).to(dev)
    W2 = (torch.randn(1, hidden, generator=g) / hidden**0.5).to(dev)
    b2 = torch.randn(1, generator=g).to(dev)

    def f_linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(F.linear(x, W1, b1)), W2, b2).sum()

    def f_matmul(x: torch.Tensor) -> torch.Tensor:
        return (W2 @ torch.tanh(W1 @ x + b1) + b2).sum()

    return f_linear, f_matmul


def _hessian_variants(f: Callable, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    fns = _strategies("hessian", lambda s: gl.hessian(f, x, strategy=s))
    fns["torch.func.hessian"] = lambda: torch.func.hessian(f)(x)
    fns["autograd.functional.hessian"] = lambda: torch.autograd.functional.hessian(f, x)
    fns["autograd.functional.hessian(vectorize)"] = lambda: torch.autograd.functional.hessian(
        f, x, vectorize=True
    )
    return fns


def _jacobian_variants(f: Callable, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    fns = _strategies("jacobian", lambda s: gl.jacobian(f, x, strategy=s))
    fns["torch.func.jacrev"] = lambda: torch.func.jacrev(f)(x)
    fns["torch.func.jacfwd"] = lambda: torch.func.jacfwd(f)(x)
    fns["autograd.functional.jacobian"] = lambda: torch.autograd.functional.jacobian(f, x)
    fns["autograd.functional.jacobian(vectorize)"] = lambda: torch.autograd.functional.jacobian(
        f, x, vectorize=True
    )
    return fns


def _hvp_variants(batch: int, dev: torch.device) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10)).to(dev)
    fm = gl.functional(model)
    params = fm.params
    x = torch.randn(batch, 784, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(fm(p, x), y)

    names = list(params)

    def loss_tuple(*ps: torch.Tensor) -> torch.Tensor:
        return loss(dict(zip(names, ps)))

    p_tuple = tuple(params.values())
    v_tuple = tuple(v.values())

    def gradient_only() -> object:
        return torch.func.grad(loss)(params)

    fns = _strategies("hvp", lambda s: gl.hvp(loss, params, v, strategy=s))
    fns["autograd.functional.hvp"] = lambda: torch.autograd.functional.hvp(
        loss_tuple, p_tuple, v_tuple
    )
    fns["gradient (reference)"] = gradient_only
    return fns


def _derivative_variants(x: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    f = torch.tanh
    fns = _strategies("derivative", lambda s: gl.derivative(f, x, order=k, strategy=s))
    if k > 4:
        del fns["forward"]  # nested jvp: seconds per call at k = 8

    def nested_autograd() -> torch.Tensor:
        z = x.detach().requires_grad_(True)
        y = f(z)
        for _ in range(k):
            (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        return y.detach()

    fns["nested autograd.grad"] = nested_autograd
    return fns


def _grad_pairs(dev: torch.device) -> dict[str, dict[str, Callable[[], object]]]:
    """``gl.grad`` against ``torch.autograd.grad`` on an overhead-bound graph (an MLP of 4
    Linear(16) + Tanh layers, batch 8: a call of about a hundred microseconds, most of it
    Python and dispatch), w.r.t. the input and w.r.t. the parameters. Each call builds the
    graph again (forward, mean of squares) and differentiates it."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    mlp = nn.Sequential(*layers).to(dev)
    x = torch.randn(8, 16, device=dev, requires_grad=True)
    params = list(mlp.parameters())
    return {
        "gl.grad w.r.t. the input, MLP 4x16 b=8": {
            "torch.autograd.grad": lambda: torch.autograd.grad(mlp(x).pow(2).mean(), x),
            "gl.grad": lambda: gl.grad(mlp(x).pow(2).mean(), x),
        },
        "gl.grad w.r.t. 8 parameters, MLP 4x16 b=8": {
            "torch.autograd.grad": lambda: torch.autograd.grad(mlp(x).pow(2).mean(), params),
            "gl.grad": lambda: gl.grad(mlp(x).pow(2).mean(), params),
        },
    }


def _hvp_pair(
    hidden: int, batch: int, dev: torch.device
) -> tuple[int, dict[str, Callable[[], object]]]:
    """``gl.hvp`` (``"auto"``, which runs double backward) against the same double backward
    written out by hand, on the same functional cross-entropy loss of an MLP 784-hidden-10
    w.r.t. its parameter dict: (number of parameters, the two variants)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dev)
    fm = gl.functional(model)
    params = fm.params
    x = torch.randn(batch, 784, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    names, p_list, v_list = list(params), list(params.values()), list(v.values())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(fm(p, x), y)

    def hand() -> object:
        ps = [p.detach().requires_grad_(True) for p in p_list]
        value = loss(dict(zip(names, ps)))
        g = torch.autograd.grad(value, ps, create_graph=True)
        hv = torch.autograd.grad(g, ps, v_list)
        return value.detach(), dict(zip(names, hv))

    n = sum(p.numel() for p in p_list)
    return n, {"hand-written double backward": hand, "gl.hvp": lambda: gl.hvp(loss, params, v)}


def _thin_wrappers(ctx: Context) -> Table:
    """gl.grad / torch.autograd.grad (target <= 1.10x) and gl.hvp / a hand-written double
    backward (target <= 1.05x at ~100k and ~1M parameters), one torch thread."""
    table = Table(
        "Thin wrappers against the torch code they wrap, one thread",
        ["case", "variant", "median_s", "ratio", "target"],
        notes=[
            "ratio: median over turns of time(variant) / time(baseline), the two alternating in "
            "runs of 8 calls, the first not recorded (time_alternating, block=8, skip=1); "
            "torch.set_num_threads(1) for this table. gl.grad: each call builds the graph "
            "(forward, mean of squares) and differentiates it. gl.hvp: strategy 'auto' at its "
            "steady state (it runs double backward), against the same double backward of the "
            "same functional loss written out (detached leaves, autograd.grad with "
            "create_graph=True, then autograd.grad(g, params, v)).",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases: list[tuple[str, str, dict[str, Callable[[], object]], float]] = [
            (case, "torch.autograd.grad", fns, 1.10)
            for case, fns in _grad_pairs(ctx.device).items()
        ]
        for hidden in (128, 1270):
            n, fns = _hvp_pair(hidden, 64, ctx.device)
            case = f"gl.hvp, MLP 784-{hidden}-10 ({n:,} params) b=64"
            cases.append((case, "hand-written double backward", fns, 1.05))
        for case, base, fns, target in cases:
            ctx.progress(case)
            _settle({"auto": fns["gl.hvp"]} if "gl.hvp" in fns else {})
            timings, ratios = time_alternating(
                fns, ctx=ctx, baseline=base, rounds=ctx.rounds, block=8, skip=1
            )
            for name in fns:
                verdict = {} if name == base else {"target": judge(ratios[name], at_most=target)}
                table.add(
                    case=case,
                    variant=name,
                    median_s=timings[name].median,
                    ratio=ratios[name],
                    **verdict,
                )
    finally:
        torch.set_num_threads(threads)
    return table


def run(ctx: Context) -> list[Table]:
    dev = ctx.device
    summary: list[dict[str, object]] = []

    def track(case: str, fns: dict[str, Callable[[], object]], ratios: dict[str, float]) -> None:
        choice, heuristic = _choice(case.split()[0])
        best, focused = _versus_best(fns, ratios, ctx)
        first, later = _first_call_ratio(fns, ctx)
        summary.append(
            {
                "case": case,
                "best": best,
                "auto_ratio_to_best": focused["auto"],
                "heuristic_ratio_to_best": focused["heuristic"],
                "auto_target": judge(focused["auto"], at_most=1.1),
                "heuristic_target": judge(focused["heuristic"], at_most=1.5),
                "auto_choice": choice,
                "heuristic_choice": heuristic,
                "first_call_ratio": first,
                "first_call_target": judge(first, at_most=3.0),
                "worst_trial_call_ratio": later,
            }
        )

    # 1. Hessians
    n = ctx.pick(64, 256, 256)
    hidden = ctx.pick(64, 256, 512)
    t_h = Table(
        f"Hessian of sum(W2 tanh(W1 x + b1)), n={n} inputs, hidden={hidden}",
        ["case", "variant", "median_s", "ratio_to_best"],
    )
    f_linear, f_matmul = _tanh_net(n, hidden, dev)
    x = torch.randn(n, device=dev)
    for label, f in (("F.linear form", f_linear), ("W @ x form", f_matmul)):
        ctx.progress(f"hessian {label}")
        fns = _hessian_variants(f, x)
        track(f"hessian {label}", fns, _rows(t_h, label, fns, ctx, rounds=ctx.pick(3, 3, 9)))

    # 2. Jacobians
    t_j = Table("Jacobian of tanh(W x)", ["case", "variant", "median_s", "ratio_to_best"])
    big = ctx.pick(128, 512, 512)
    for n_in, n_out in ((big, 16), (16, big)):
        W = torch.randn(n_out, n_in, device=dev) / n_in**0.5
        xj = torch.randn(n_in, device=dev)

        def fj(z: torch.Tensor, W: torch.Tensor = W) -> torch.Tensor:
            return torch.tanh(W @ z)

        label = f"{n_in} -> {n_out}"
        ctx.progress(f"jacobian {label}")
        fns = _jacobian_variants(fj, xj)
        track(f"jacobian {label}", fns, _rows(t_j, label, fns, ctx, rounds=ctx.pick(3, 3, 9)))

    # 3. HVPs
    t_v = Table(
        "HVP of an MLP 784-128-10 cross-entropy loss w.r.t. its 101,770 parameters",
        ["case", "variant", "median_s", "ratio_to_best"],
        notes=["gradient (reference): one gradient of the loss, for scale; not a candidate."],
    )
    for batch in (ctx.pick(16, 64, 64), ctx.pick(64, 512, 512)):
        ctx.progress(f"hvp batch {batch}")
        fns = _hvp_variants(batch, dev)
        track(f"hvp batch {batch}", fns, _rows(t_v, f"batch {batch}", fns, ctx))

    # 4. k-th derivatives
    size = ctx.pick(4096, 65536, 262144)
    t_d = Table(
        f"k-th derivative of tanh, x with {size} elements",
        ["case", "variant", "median_s", "ratio_to_best", "growth_vs_k1"],
        notes=[
            "growth_vs_k1: time at order k / time of the same variant at k = 1.",
            "forward (nested jvp) is timed up to k = 4 only: it costs seconds at k = 8.",
        ],
    )
    xd = torch.randn(size, device=dev)
    quick = dataclasses.replace(ctx, size="quick")  # short blocks (8 orders x 5 variants) ...
    first: dict[str, float] = {}
    for k in range(1, 9):
        ctx.progress(f"derivative order {k}")
        fns = _derivative_variants(xd, k)
        timings, ratios = time_alternating(fns, ctx=quick, rounds=ctx.rounds, block=2, skip=1)
        best = min(ratios.values())
        for name in fns:
            first.setdefault(name, timings[name].median)
            t_d.add(
                case=f"k={k}",
                variant=name,
                median_s=timings[name].median,
                ratio_to_best=ratios[name] / best,
                growth_vs_k1=timings[name].median / first[name],
            )
        track(f"derivative k={k}", fns, {n: ratios[n] / best for n in fns})

    t_auto = Table(
        "auto and the heuristic versus the best variant, per case",
        [
            "case",
            "best",
            "auto_ratio_to_best",
            "heuristic_ratio_to_best",
            "auto_target",
            "heuristic_target",
            "auto_choice",
            "heuristic_choice",
            "first_call_ratio",
            "first_call_target",
            "worst_trial_call_ratio",
        ],
    )
    t_auto.notes.append(
        "best: the fastest variant of the case's table other than auto and heuristic (a "
        "gradlab strategy or torch's own function). The ratios here come from a second, "
        "focused measurement of best, auto and heuristic alone (time_alternating, block=9, "
        "skip=1: each ratio of a turn is that of two medians of 8 calls; a new random order "
        "every turn): in the full table each of them sits among up "
        "to nine variants, some 70x slower, whose after-effects on caches and the allocator "
        "made identical code (auto and heuristic choose the same strategy) read up to 1.13x "
        "apart."
    )
    t_auto.notes.append(
        "first_call_ratio: a key's first auto call (the autotune cache cleared, the process "
        "warm) over a steady auto call, median over rounds; it pays the one-off measurement "
        "(help(gradlab.autotune) states the bound); target <= 3x."
    )
    t_auto.notes.append(
        "worst_trial_call_ratio: the slowest of the calls after the first that try the "
        "challengers auto did not run in the first call (vectorised strategies, each call running "
        "one strategy and returning its result) over a steady call, median over rounds; 0: no "
        "trial. A clearly slower challenger is dropped after one such call."
    )
    for row in summary:
        t_auto.add(**row)
    for col, target in (
        ("auto_ratio_to_best", 1.1),
        ("heuristic_ratio_to_best", 1.5),
        ("first_call_ratio", 3.0),
    ):
        worst = max(summary, key=lambda r: r[col])  # type: ignore[arg-type, return-value]
        t_auto.notes.append(
            f"{col.split('_')[0]}: worst {worst[col]:.3f}x ({worst['case']}); target <= {target}x"
        )
    ctx.progress("thin wrappers")
    t_thin = _thin_wrappers(ctx)
    return [t_h, t_j, t_v, t_d, t_auto, t_thin]


SUITE = Suite(
    name="derivatives",
    description="Hessian / Jacobian / HVP / k-th derivative: every strategy, auto, torch's own",
    run=run,
    seconds={"quick": 38, "default": 115, "full": 355},
    single_threaded=True,  # auto runs no forward mode while other threads are alive
)
