"""checking: gradlab.testing.check_gradients vs torch.autograd.gradcheck.

1. Time: checking ``tanh(A @ x)`` (float64, ``A`` n x n) at several n, every Jacobian entry
   (``gradlab full`` vs ``gradcheck(fast_mode=False)``) and by random directions (``gradlab
   fast`` vs ``gradcheck(fast_mode=True)``), measured interleaved. ``speedup_ratio`` on a torch
   row is how many times faster the gradlab check of the same kind is; the goal is >= 10x for
   the full check against ``gradcheck(fast_mode=False)``.
2. Power: a custom ``autograd.Function`` computing ``tanh(A @ x)`` whose backward is wrong in a
   single Jacobian entry (by 1.0 and by 1e-3) is given to each checker; ``caught`` records
   whether it raised/returned a failure (measured, not assumed).
3. Bug classes: every planted bug of :mod:`benchmarks._planted` (one per class that
   ``gradcheck``/``gradgradcheck`` catch, plus a wrong vmap rule) given to gradlab full/fast and
   to ``gradcheck``, ``gradcheck(fast_mode=True)`` and ``gradgradcheck``; the correct twin of
   each case must pass everywhere (false alarms are listed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks._core import Context, Suite, Table, judge, time_interleaved
from benchmarks._planted import CASES, caught_by_gradlab, caught_by_torch, tanh_affine, tanh_problem
from gradlab.testing import GradientCheckError, check_gradients


def _caught_gradlab(fn: Callable[..., torch.Tensor], x: torch.Tensor, mode: str) -> bool:
    try:
        check_gradients(fn, x, mode=mode)  # type: ignore[arg-type]
    except GradientCheckError:
        return True
    return False


def _caught_torch(fn: Callable[..., torch.Tensor], x: torch.Tensor, fast: bool) -> bool:
    ok = torch.autograd.gradcheck(
        fn, (x.detach().requires_grad_(True),), fast_mode=fast, raise_exception=False
    )
    return not ok


def _variants(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> dict[str, Callable[[], object]]:
    xr = x.detach().requires_grad_(True)
    return {
        "gradlab full": lambda: check_gradients(fn, x, mode="full"),
        "torch gradcheck": lambda: torch.autograd.gradcheck(fn, (xr,), fast_mode=False),
        "gradlab fast": lambda: check_gradients(fn, x, mode="fast", seed=0),
        "torch gradcheck fast": lambda: torch.autograd.gradcheck(fn, (xr,), fast_mode=True),
    }


def run(ctx: Context) -> list[Table]:
    dev = ctx.device
    sizes = ctx.pick((32, 64), (128, 256, 512), (128, 256, 512, 1024))
    t1 = Table(
        "Checking tanh(A @ x), float64: time per check",
        ["n", "variant", "median_s", "iqr_s", "speedup_ratio", "target", "checks"],
        notes=[
            "speedup_ratio: how many times faster gradlab is. torch gradcheck: median over "
            "interleaved rounds of time(torch gradcheck) / time(gradlab full); torch gradcheck "
            "fast: the same ratio for torch fast divided by that for gradlab fast (i.e. "
            "time(torch fast) / time(gradlab fast), from the same rounds).",
            "checks: Jacobian entries compared (full) or random direction pairs (fast).",
        ],
    )
    for n in sizes:
        A, x = tanh_problem(n, device=dev)

        def fn(v: torch.Tensor, A: torch.Tensor = A) -> torch.Tensor:
            return torch.tanh(A @ v)

        variants = _variants(fn, x)
        ctx.progress(f"n={n}: timing {list(variants)}")
        timings, ratios = time_interleaved(variants, ctx=ctx, baseline="gradlab full")
        probes = check_gradients(fn, x, mode="fast", seed=0).probes
        for name, tm in timings.items():
            speedup = {
                "gradlab full": 1.0,
                "torch gradcheck": ratios[name],
                "gradlab fast": 1.0,
                "torch gradcheck fast": ratios[name] / ratios["gradlab fast"],
            }[name]
            t1.add(
                n=n,
                variant=name,
                median_s=tm.median,
                iqr_s=tm.iqr,
                speedup_ratio=speedup,
                target=judge(speedup, at_least=5.0) if name == "torch gradcheck" else None,
                checks=n * n if name.endswith("full") or name == "torch gradcheck" else probes,
            )

    t2 = Table(
        "Catching one wrong Jacobian entry in tanh(A @ x), float64",
        ["case", "checker", "caught"],
        notes=[
            "caught: the checker raised (gradlab: GradientCheckError) or returned False "
            "(torch: raise_exception=False); measured on this run, not assumed.",
        ],
    )
    cases = ctx.pick(
        ((128, 1.0), (128, 1e-3)),
        ((128, 1.0), (128, 1e-3), (512, 1.0), (512, 1e-3)),
        ((128, 1.0), (128, 1e-3), (512, 1.0), (512, 1e-3)),
    )
    for n, delta in cases:
        A, x = tanh_problem(n, device=dev)
        bad = tanh_affine(A, wrong=(n // 3, (2 * n) // 3), delta=delta)
        label = f"n={n}, entry ({n // 3}, {(2 * n) // 3}) off by {delta:g}"
        ctx.progress(label)
        caught = {
            "torch gradcheck(fast_mode=True)": _caught_torch(bad, x, True),
            "torch gradcheck(fast_mode=False)": _caught_torch(bad, x, False),
            "gradlab check_gradients fast": _caught_gradlab(bad, x, "fast"),
            "gradlab check_gradients full": _caught_gradlab(bad, x, "full"),
        }
        for name, yes in caught.items():
            t2.add(case=label, checker=name, caught="yes" if yes else "no")
    return [t1, t2, _bug_classes(ctx)]


_TORCH_CHECKERS = ("gradcheck", "gradcheck fast", "gradgradcheck")


def _bug_classes(ctx: Context) -> Table:
    t = Table(
        "Planted bug classes: caught by each checker (float64, CPU)",
        ["bug", "item", "gradlab full", "gradlab fast", *_TORCH_CHECKERS, "false alarms"],
        notes=[
            "yes: the checker rejected the wrong version (gradlab: GradientCheckError; torch: "
            "returned False with raise_exception=False); error: torch raised something else. "
            "Each case's options are the same for every checker (forward mode: gradlab "
            "forward_ad=True, torch check_forward_ad=True; the order-2 case: gradlab order=2).",
            "false alarms: checkers that rejected the correct twin (should be none).",
            "Cases: benchmarks/_planted.py. gradgradcheck checks second derivatives only, so "
            "first-order bugs it reports are side effects of its first-order pass.",
        ],
    )
    for name, case in CASES.items():
        ctx.progress(f"bug class: {name}")
        row: dict[str, str] = {"bug": name, "item": case.item}
        alarms = []
        for mode in ("full", "fast"):
            row[f"gradlab {mode}"] = "yes" if caught_by_gradlab(case, True, mode) else "no"
            if caught_by_gradlab(case, False, mode):
                alarms.append(f"gradlab {mode}")
        for checker in _TORCH_CHECKERS:
            if checker == "gradgradcheck" or case.order == 1:
                row[checker] = caught_by_torch(case, True, checker)
                if caught_by_torch(case, False, checker) != "no":
                    alarms.append(checker)
            else:
                row[checker] = "n/a (order 2)"
        t.add(**row, **{"false alarms": ", ".join(alarms) or "none"})
    return t


SUITE = Suite(
    name="checking",
    description="check_gradients vs torch.autograd.gradcheck: speed (full/fast) and power",
    run=run,
    seconds={"quick": 5, "default": 21},
)
