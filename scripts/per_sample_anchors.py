"""The per_sample suite's cases at issue 23's batches, alone: per-sample gradients of the MLP at
b=128, norms and gradients of the 550k CNN at b=64 (the ``--full`` sizes of those cases), one
thread, with the suite's own steps and timing. Prints one line per table row.

    python scripts/per_sample_anchors.py                # the three cases
    python scripts/per_sample_anchors.py mlp:grads:128  # kind:family:batch, any of them
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks._core import Context, Table
from benchmarks.suites import per_sample as ps


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    ctx = Context(device=torch.device("cpu"), progress=lambda m: print(m, file=sys.stderr))
    torch.manual_seed(0)
    models = {"mlp": ps.mlp(1024), "cnn": ps.cnn(1)}
    inputs = {"mlp": (784,), "cnn": (3, 32, 32)}
    plan = [a.split(":") for a in argv] or [
        ["mlp", "grads", "128"], ["cnn", "norms", "64"], ["cnn", "grads", "64"]
    ]  # fmt: skip
    columns = ["case", "variant", "median_s", "ratio_to_plain", "versus", "ratio_to_versus"]
    table = Table("anchors", [*columns, "iqr_s", "target"], keys=["case", "variant", "versus"])
    for kind, family, batch in plan:
        b = int(batch)
        x, y = torch.randn(b, *inputs[kind]), torch.randint(0, 10, (b,))
        steps = ps.make_steps(models[kind], x, y, ps.NORMS if family == "norms" else ps.GRADS)
        ps._time_case(ctx, table, f"{kind} {family} b={b}", kind, steps)
    for row in table.rows:
        print({k: v for k, v in row.items() if v is not None and not k.startswith("_")})


if __name__ == "__main__":
    main(sys.argv[1:])
