"""Bad input and misuse: clear errors that name the argument and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab import GradlabError
from gradlab.per_sample import PerSampleGradients, per_sample_grads
from tests.per_sample._reference import WeightUsedOutside


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _step(model: nn.Module, ps: PerSampleGradients, b: int = 5) -> None:
    with ps:
        F.cross_entropy(model(torch.randn(b, 3)), torch.randint(0, 2, (b,))).backward()


def test_batch_norm_in_training_mode_is_refused_naming_module_and_fixes() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError,
        match=r"PerSampleGradients: .*'1' \(BatchNorm1d\).*eval.*GroupNorm.*per_sample_grads",
    ):
        PerSampleGradients(model).__enter__()
    assert not model[1]._forward_pre_hooks and not model[0]._forward_hooks


def test_batch_norm_switched_to_training_inside_the_context() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="BatchNorm1d"), PerSampleGradients(model):
        model.train()
        model(torch.randn(4, 3))
    assert not model[1]._forward_pre_hooks


def test_batch_norm_without_running_stats_is_refused_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="batch statistics"):
        PerSampleGradients(model).__enter__()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stats": ("norm", "hessian")}, ValueError, r"stats must be names from .*'hessian'"),
        (
            {"stats": "norm"},
            TypeError,
            r"stats must be a tuple of names, got 'norm'. Write stats=\('norm',\)",
        ),
        (
            {"loss_reduction": "avg"},
            ValueError,
            r"loss_reduction must be 'mean' or 'sum', got 'avg'",
        ),
        ({"scaler": 2.0}, TypeError, "scaler must be a torch.amp.GradScaler"),
    ],
    ids=["unknown_stat", "stats_string", "reduction", "scaler"],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        PerSampleGradients(_mlp(), **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        PerSampleGradients(lambda x: x)  # type: ignore[arg-type]


def test_reading_a_statistic_not_asked_for() -> None:
    model = _mlp()
    ps = PerSampleGradients(model, stats=("norm",))
    _step(model, ps)
    with pytest.raises(GradlabError, match=r"grad was not computed.*stats=\(..., 'grad'\)"):
        _ = ps.grad
    with pytest.raises(GradlabError, match="dot was not computed"):
        ps.dot({})


def test_reading_before_backward() -> None:
    model = _mlp()
    with PerSampleGradients(model) as ps:
        model(torch.randn(2, 3))
        with pytest.raises(GradlabError, match="no backward pass has run"):
            _ = ps.norm


def test_batch_sizes_differ_between_modules() -> None:
    class Folding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).reshape(-1, 8))

    model = Folding()
    with pytest.raises(ValueError, match=r"batch sizes differ between modules: a saw 6 .* b saw 3"):
        with PerSampleGradients(model):
            model(torch.randn(6, 3))
    assert not model.a._forward_hooks


def test_dot_checks_names_and_shapes() -> None:
    model = _mlp()
    ps = PerSampleGradients(model, stats=("dot",))
    _step(model, ps)
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert ps.dot(v).shape == (5,)
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unknown \['x'\]"):
        ps.dot({**{k: t for k, t in v.items() if k != "2.bias"}, "x": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"v\['0.weight'\] must have the parameter's shape \(4, 3\), got \(3, 4\)"
    ):
        ps.dot({**v, "0.weight": torch.zeros(3, 4)})
    with pytest.raises(TypeError, match="v must be a dict"):
        ps.dot([1, 2])  # type: ignore[arg-type]
    ps.close()
    with pytest.raises(GradlabError, match="close"):
        ps.dot(v)


def test_forward_again_after_backward() -> None:
    model = _mlp()
    with pytest.raises(GradlabError, match=r"ran again after the backward pass.*new context"):
        with PerSampleGradients(model):
            F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
            model(torch.randn(4, 3))


def test_dropout_inside_a_replayed_module() -> None:
    model = nn.Sequential(nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True))
    with pytest.raises(ValueError, match=r"dropout=0.5.*Set its dropout to 0 or put it in eval"):
        with PerSampleGradients(model):
            x = torch.randn(3, 2, 4)
            model[0](x, x, x)


def test_embedding_scale_grad_by_freq_is_refused() -> None:
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        PerSampleGradients(nn.Embedding(5, 2, scale_grad_by_freq=True)).__enter__()


def test_parameter_used_outside_its_module() -> None:
    model = WeightUsedOutside()
    with pytest.raises(GradlabError, match=r"'lin.weight' received a gradient, but not through"):
        with PerSampleGradients(model) as ps:
            model(torch.randn(4, 3)).sum().backward()
        _ = ps.norm


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(3),), TypeError, "params must be a dict"),
        (({"w": torch.randn(2)},), ValueError, "batch is empty"),
        (
            ({"w": torch.randn(2)}, torch.randn(3, 2), torch.randn(4)),
            ValueError,
            r"got sizes \[3, 4\]",
        ),
        (({"w": torch.randn(2)}, [1.0, 2.0]), TypeError, r"batch\[0\] must be a tensor"),
    ],
    ids=["params", "empty", "sizes", "not_tensor"],
)
def test_per_sample_grads_bad_input(args, error, match) -> None:
    with pytest.raises(error, match=f"per_sample_grads: .*{match}"):
        per_sample_grads(lambda p, *b: p["w"].sum(), *args)


def test_per_sample_grads_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        per_sample_grads(
            lambda p, x: (p["w"] * x).sum(), {"w": torch.ones(2)}, torch.ones(3, 2), chunk_size=0
        )
