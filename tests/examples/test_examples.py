"""The example scripts of examples/ run at a smoke size, and what they print is right."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


def test_stylegan2_regularizers_runs_with_both_lazy_penalties():
    example = _load("stylegan2_regularizers")
    metrics = example.main(steps=3, batch=8, r1_every=2, pl_every=2, log_every=0)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["r1"] > 0  # R1 ran (steps 0 and 2) and the critic has a non-zero gradient
    assert metrics["pl_mean"] > 0  # the path length running mean was updated


def test_curvature_example_matches_the_dense_hessian():
    example = _load("curvature_of_a_trained_model")
    out = example.main(epochs=5, n=96, width=6, verbose=False)
    model, batches = out["model"], out["batches"]
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names]).double()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])

    def loss(theta):  # the dataset-mean loss as a function of the flattened parameters
        pieces = dict(
            zip(
                names, (p.view(s) for p, s in zip(theta.split([s.numel() for s in shapes]), shapes))
            )
        )
        logits = torch.func.functional_call(model.double(), pieces, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    H = torch.autograd.functional.hessian(loss, flat)
    model.float()
    eig = torch.linalg.eigvalsh(H)
    top3 = eig[eig.abs().argsort(descending=True)[:3]]
    # float32 products against a float64 dense Hessian: relative 1e-4 of the largest scale
    scale = H.abs().max().item()
    assert float(out["trace"]) == pytest.approx(H.trace().item(), abs=1e-4 * scale * len(flat))
    assert torch.allclose(out["top"].double(), top3, atol=1e-4 * scale)
    diag = torch.cat([out["diagonal"][k].reshape(-1) for k in names]).double()
    assert torch.allclose(diag, H.diagonal(), atol=1e-5 * scale)
    assert out["spectrum"].grid.shape == out["spectrum"].density.shape


def test_check_a_custom_function_passes_the_right_one_and_catches_the_bug():
    example = _load("check_a_custom_function")
    results = example.main(max_examples=8, verbose=False)
    assert results["LogCosh"] == "ok"
    assert "wrong derivative" in results["BuggyLogCosh"]
    # the planted bug is real: the derivative of log cosh is tanh (float64, written out)
    x = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(example.BuggyLogCosh.apply(x).sum(), x)
    assert abs(g.item() - math.tanh(3.0)) > 1e-2


def test_finetune_example_keeps_the_frozen_block_bit_identical():
    example = _load("finetune_with_freezing")
    out = example.main(pretrain_epochs=1, epochs=2, n=128)
    assert out["frozen_block_unchanged"] is True
    assert out["param_groups"] == 2  # the head, then block "1" unfrozen after the first epoch
    assert math.isfinite(out["loss"])


def test_monitor_example_logs_every_step_and_names_the_planted_nan(tmp_path):
    pytest.importorskip("tensorboard")
    example = _load("monitor_tensorboard")
    out = example.main(3, tmp_path)
    assert out["steps"] == 3
    assert out["nan_source"] == "3"  # the Broken module, 4th in the Sequential
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert out["scalars"]["grad/total_norm"] > 0
