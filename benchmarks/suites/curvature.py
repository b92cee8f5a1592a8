"""curvature: gradlab's Hessian estimators against hand-written loops, PyHessian and BackPACK.

Tables:

1. *Hutchinson trace*: ``gl.hessian_trace(samples=S)`` against the loop PyHessian runs (one
   ``autograd.grad(create_graph=True)``, then per probe a Rademacher vector per parameter,
   ``autograd.grad(g, params, v, retain_graph=True)`` and ``sum(v * Hv)``), and PyHessian's own
   ``hessian(...).trace`` when ``pyhessian`` is installed. Each call builds the gradient graph
   once and runs S products. Target: gradlab / hand-written <= 1.0 (issue 25).
2. *Top-1 eigenvalue to 1e-2*: ``gl.hessian_eigenvalues(k=1, tol=1e-2)`` (Lanczos; it stops
   when the residual of the top Ritz pair, a bound on its error, is below ``tol`` of it)
   against power iteration written like PyHessian's (its default ``tol=1e-3`` on the change of
   the Rayleigh quotient) and PyHessian's own, each call from the next of a cycle of start
   vectors (the same for every variant); the mean products used and the relative error reached
   against a converged Lanczos value are listed. Target: gradlab / power iteration <= 1.0.
3. *Exact diagonal*: ``gl.hessian_diagonal(method="exact")`` (Hessian backpropagation where the
   model is supported, see ``gradlab.curvature._backprop``), the same forced onto its HVP
   fallback, and BackPACK's ``DiagHessian`` when ``backpack-for-pytorch`` is installed.
4. *Batched vs one-at-a-time products*: the time per product of a block of 32 vectors with one
   vmapped double backward against 32 plain ones, by model size: the measurement behind
   ``gradlab.curvature._operator.BATCHED_MAX_N``.

Sizes: the default runs small models; ``--full`` the issue's (MLP 784-500-10 with ~398k
parameters at batch 128, a CNN with ~143k parameters at batch 32).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

import gradlab as gl
from benchmarks._core import Context, Suite, Table, judge, time_interleaved
from gradlab.curvature import _backprop, _operator


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _cnn(width: int) -> nn.Module:
    """Three 3x3 conv layers with pooling and a two-layer head, for 3x32x32 inputs."""
    w1, w2, w3 = width, 2 * width, 3 * width
    return nn.Sequential(
        nn.Conv2d(3, w1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(w3 * 16, 44),
        nn.ReLU(),
        nn.Linear(44, 10),
    )


def _problems(ctx: Context) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    dev = ctx.device
    hidden = ctx.pick(32, 64, 500)
    width = ctx.pick(8, 16, 32)
    mb, cb = ctx.pick(32, 64, 128), ctx.pick(8, 16, 32)
    mlp, cnn = _mlp(hidden).to(dev), _cnn(width).to(dev)
    out = []
    for label, model, x, y in (
        (f"MLP 784-{hidden}-10", mlp, torch.randn(mb, 784), torch.randint(0, 10, (mb,))),
        (f"CNN width {width}", cnn, torch.randn(cb, 3, 32, 32), torch.randint(0, 10, (cb,))),
    ):
        n = sum(p.numel() for p in model.parameters())
        out.append((f"{label} ({n:,} params, batch {len(x)})", model, x.to(dev), y.to(dev)))
    return out


def _pyhessian() -> object | None:
    if importlib.util.find_spec("pyhessian") is None:
        return None
    from pyhessian import hessian

    return hessian


def _trace_variants(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int
) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    criterion = nn.CrossEntropyLoss()

    def loss_fn() -> torch.Tensor:
        return criterion(model(x), y)

    def hand() -> float:
        g = torch.autograd.grad(loss_fn(), params, create_graph=True)
        total = 0.0
        for _ in range(samples):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in params]
            hv = torch.autograd.grad(g, params, v, retain_graph=True)
            total += sum(float((a * b).sum()) for a, b in zip(hv, v))
        return total / samples

    def gradlab() -> torch.Tensor:
        return gl.hessian_trace(loss_fn, params, samples=samples, mode=None)

    def gradient() -> object:
        return torch.autograd.grad(loss_fn(), params)

    fns: dict[str, Callable[[], object]] = {
        "hand-written HVP loop": hand,
        "gradlab hessian_trace": gradlab,
    }
    hessian = _pyhessian()
    if hessian is not None and x.device.type == "cpu":

        def pyhessian() -> object:
            h = hessian(model, criterion, data=(x, y), cuda=False)  # type: ignore[operator]
            out = h.trace(maxIter=samples, tol=float("-inf"))  # never stops early
            model.zero_grad(set_to_none=True)
            return out

        fns["pyhessian trace"] = pyhessian
    fns["one gradient (reference)"] = gradient
    return fns


def _power_like_pyhessian(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], tol: float, max_iter: int
) -> tuple[float, int]:
    """PyHessian's ``eigenvalues(top_n=1)``: power iteration, stop on a relative change < tol."""
    g = torch.autograd.grad(loss_fn(), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((a * a).sum() for a in v))  # type: ignore[arg-type]
    v = [a / (norm + 1e-6) for a in v]
    eigenvalue = None
    steps = 0
    for _ in range(max_iter):
        hv = torch.autograd.grad(g, params, v, retain_graph=True)
        steps += 1
        tmp = float(sum((a * b).sum() for a, b in zip(hv, v)))
        norm = torch.sqrt(sum((a * a).sum() for a in hv))  # type: ignore[arg-type]
        v = [a / (norm + 1e-6) for a in hv]
        if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
            eigenvalue = tmp
            break
        eigenvalue = tmp
    return float(eigenvalue or 0.0), steps


@contextlib.contextmanager
def _hvp_fallback() -> Iterator[None]:
    """Force the exact diagonal onto its Hessian-vector-product fallback."""
    real = _backprop.exact_diagonal
    _backprop.exact_diagonal = lambda loss_fn, params: None  # type: ignore[assignment]
    try:
        yield
    finally:
        _backprop.exact_diagonal = real  # type: ignore[assignment]


def _table_trace(ctx: Context) -> Table:
    samples = ctx.pick(5, 10, 20)
    t = Table(
        f"Hutchinson trace, {samples} probes: gradlab vs a hand-written HVP loop (PyHessian's)",
        ["case", "variant", "median_s", "iqr_s", "ratio_vs_hand", "target"],
        notes=[
            "ratio_vs_hand: median over interleaved rounds of time / time(hand-written loop); "
            "target <= 1.0 for gradlab.",
            "Every variant builds the gradient graph once per call and runs the same number of "
            "products; 'one gradient' is one forward + backward, for scale.",
        ],
    )
    for label, model, x, y in _problems(ctx):
        ctx.progress(f"trace: {label}")
        fns = _trace_variants(model, x, y, samples)
        timings, ratios = time_interleaved(fns, ctx=ctx)
        for name in fns:
            t.add(
                case=label,
                variant=name,
                median_s=timings[name].median,
                iqr_s=timings[name].iqr,
                ratio_vs_hand=ratios[name],
                target=judge(ratios[name], at_most=1.0) if name.startswith("gradlab") else None,
            )
    return t


_START_VECTORS = 24  # the top-1 calls cycle through this many seeds (the same for every variant)


def _table_top1(ctx: Context) -> Table:
    t = Table(
        "Top-1 eigenvalue to 1e-2: gradlab Lanczos vs power iteration written like PyHessian's",
        [
            "case",
            "variant",
            "median_s",
            "mean_products",
            "median_rel_error",
            "max_rel_error",
            "ratio_vs_power",
            "target",
        ],
        notes=[
            "gradlab: hessian_eigenvalues(k=1, tol=1e-2): stops when the residual of the top Ritz "
            "pair is below 1e-2 of its value (ARPACK's rule; a bound on the error). Power "
            "iteration: PyHessian's rule (relative change of the Rayleigh quotient < 1e-3, its "
            "default). rel_error against Lanczos run to 1e-10.",
            f"Each call starts from the next of {_START_VECTORS} random vectors (seeds 0, 1, ...; "
            "every variant sees the same seeds in the same rounds): the number of products of "
            "both methods depends on the start vector (power iteration: 10-37 on the 400k MLP), "
            "so one fixed seed would compare luck.",
        ],
    )
    for label, model, x, y in _problems(ctx):
        ctx.progress(f"top-1 eigenvalue: {label}")
        _top1_case(ctx, t, label, model, x, y)
    return t


def _top1_case(
    ctx: Context, t: Table, label: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> None:
    hessian = _pyhessian()
    params = list(model.parameters())
    criterion = nn.CrossEntropyLoss()

    def loss_fn() -> torch.Tensor:
        return criterion(model(x), y)

    exact = float(
        gl.hessian_eigenvalues(loss_fn, params, k=1, tol=1e-10, max_iter=300, generator=1)
        .values[0]
        .item()
    )
    counts: dict[str, list[int]] = {}
    errors: dict[str, list[float]] = {}

    def record(name: str, value: float, products: int) -> None:
        counts.setdefault(name, []).append(products)
        errors.setdefault(name, []).append(abs(value - exact) / abs(exact))

    def seed(name: str) -> int:
        return len(counts.get(name, ())) % _START_VECTORS

    def power() -> None:
        name = "power iteration (PyHessian-style)"
        torch.manual_seed(seed(name))
        record(name, *_power_like_pyhessian(loss_fn, params, 1e-3, 100))

    def lanczos() -> None:
        name, seen = "gradlab lanczos", [0]
        res = gl.hessian_eigenvalues(
            loss_fn,
            params,
            k=1,
            tol=1e-2,
            generator=seed(name),
            mode=None,
            progress=lambda d, _: seen.append(d),
        )
        record(name, float(res.values[0]), seen[-1])

    fns: dict[str, Callable[[], object]] = {
        "power iteration (PyHessian-style)": power,
        "gradlab lanczos": lanczos,
    }
    if hessian is not None and x.device.type == "cpu":

        def pyhessian() -> None:
            name = "pyhessian eigenvalues"
            torch.manual_seed(seed(name))
            h = hessian(model, criterion, data=(x, y), cuda=False)  # type: ignore[operator]
            vals, _ = h.eigenvalues(top_n=1)
            record(name, float(vals[0]), -1)  # PyHessian does not say how many products
            model.zero_grad(set_to_none=True)

        fns["pyhessian eigenvalues"] = pyhessian
    # fixed call counts, so that round r gives every variant the same start vectors
    timings, ratios = time_interleaved(
        fns, ctx=ctx, number=3, rounds=None if ctx.smoke else ctx.pick(3, 6, 8)
    )
    for name in fns:
        products = [c for c in counts[name] if c >= 0]
        errs = sorted(errors[name])
        t.add(
            case=label,
            variant=name,
            median_s=timings[name].median,
            mean_products=sum(products) / len(products) if products else None,
            median_rel_error=errs[len(errs) // 2],
            max_rel_error=errs[-1],
            ratio_vs_power=ratios[name],
            target=judge(ratios[name], at_most=1.0) if name.startswith("gradlab") else None,
        )


def _table_diagonal(ctx: Context) -> Table:
    t = Table(
        "Exact Hessian diagonal: gradlab vs its HVP fallback and BackPACK DiagHessian",
        ["case", "variant", "median_s", "ratio_vs_first"],
        notes=[
            "gradlab exact: Hessian backpropagation where gradlab.curvature._backprop supports "
            "the model, else n products; 'HVP fallback' forces the n products. ratio_vs_first: "
            "to BackPACK where installed, else to the HVP fallback.",
        ],
    )
    backpack = importlib.util.find_spec("backpack") is not None
    for hidden in ctx.pick((8,), (8, 32), (8, 32, 64)):
        _diagonal_case(ctx, t, hidden, backpack)
    return t


def _diagonal_case(ctx: Context, t: Table, hidden: int, backpack: bool) -> None:
    dev = ctx.device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, hidden), nn.Sigmoid(), nn.Linear(hidden, 10)).to(dev)
    x, y = torch.randn(32, 100, device=dev), torch.randint(0, 10, (32,), device=dev)
    n = sum(p.numel() for p in model.parameters())
    label = f"MLP 100-{hidden}-10 sigmoid ({n:,} params, batch 32)"
    ctx.progress(f"exact diagonal: {label}")
    criterion = nn.CrossEntropyLoss()

    def loss_fn() -> torch.Tensor:
        return criterion(model(x), y)

    fns: dict[str, Callable[[], object]] = {}
    if backpack:
        from backpack import backpack as bp
        from backpack import extend
        from backpack.extensions import DiagHessian

        ext_model, ext_loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def bp_diag() -> None:
            with bp(DiagHessian()):
                ext_loss(ext_model(x), y).backward()
            ext_model.zero_grad(set_to_none=True)

        fns["backpack DiagHessian"] = bp_diag

    def hvp_diag() -> object:
        with _hvp_fallback():
            return gl.hessian_diagonal(loss_fn, model, method="exact", mode=None)

    def exact() -> object:
        return gl.hessian_diagonal(loss_fn, model, method="exact", mode=None)

    fns["gradlab exact, HVP fallback"] = hvp_diag
    fns["gradlab exact"] = exact
    timings, ratios = time_interleaved(fns, ctx=ctx, rounds=ctx.pick(2, 3, 5))
    for name in fns:
        t.add(case=label, variant=name, median_s=timings[name].median, ratio_vs_first=ratios[name])


def _table_batching(ctx: Context) -> Table:
    t = Table(
        "Batched (vmapped) vs one-at-a-time Hessian-vector products, 32 vectors, per product",
        ["case", "n", "looped_s", "batched_s", "ratio_batched_vs_looped"],
        notes=[
            f"gradlab batches products when n <= {_operator.BATCHED_MAX_N} "
            "(gradlab.curvature._operator.BATCHED_MAX_N); ratio < 1: batching wins.",
        ],
    )
    for hidden in ctx.pick((8, 64), (8, 64, 256), (8, 64, 256, 1024)):
        _batching_case(ctx, t, hidden)
    return t


def _batching_case(ctx: Context, t: Table, hidden: int) -> None:
    dev = ctx.device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dev)
    x, y = torch.randn(128, 20, device=dev), torch.randint(0, 10, (128,), device=dev)
    op = gl.hessian_operator(lambda: nn.functional.cross_entropy(model(x), y), model)
    rows = torch.randn(32, op.n, device=dev)
    label = f"MLP 20-{hidden}-10 tanh, batch 128"
    ctx.progress(f"batching: {label}")

    def run(chunk: int) -> Callable[[], object]:
        def f() -> object:
            op._chunk, op._batched = chunk, chunk > 1
            return op._rows_products(rows)

        return f

    timings, ratios = time_interleaved({"looped": run(1), "batched": run(32)}, ctx=ctx)
    t.add(
        case=label,
        n=op.n,
        looped_s=timings["looped"].median / 32,
        batched_s=timings["batched"].median / 32,
        ratio_batched_vs_looped=ratios["batched"],
    )


def run(ctx: Context) -> list[Table]:
    return [_table_trace(ctx), _table_top1(ctx), _table_diagonal(ctx), _table_batching(ctx)]


SUITE = Suite(
    name="curvature",
    description="Hessian trace / top eigenvalue / exact diagonal vs hand-written loops, PyHessian "
    "and BackPACK",
    run=run,
    seconds={"quick": 8, "default": 46, "full": 210},
)
