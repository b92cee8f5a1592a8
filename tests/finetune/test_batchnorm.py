"""FrozenBatchNorm: the numbers of an eval-mode BatchNorm, state_dict compatible, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.finetune import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)

CASES = {
    "1d-2D": (nn.BatchNorm1d, FrozenBatchNorm1d, (5, 3)),
    "1d-3D": (nn.BatchNorm1d, FrozenBatchNorm1d, (5, 3, 7)),
    "2d": (nn.BatchNorm2d, FrozenBatchNorm2d, (5, 3, 4, 4)),
    "3d": (nn.BatchNorm3d, FrozenBatchNorm3d, (5, 3, 2, 3, 3)),
}


def _trained(bn_cls: type[nn.Module], shape: tuple[int, ...], device, dtype, **kw) -> nn.Module:
    bn = bn_cls(shape[1], **kw).to(device=device, dtype=dtype).train()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        for _ in range(3):
            bn(torch.randn(shape, device=device, dtype=dtype) * 3 + 1)
    return bn.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_eval_mode_batchnorm(device: torch.device, case: str, dtype) -> None:
    bn_cls, frozen_cls, shape = CASES[case]
    bn = _trained(bn_cls, shape, device, dtype)
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    assert type(frozen) is frozen_cls
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    expected = bn(x)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    for mode in (True, False):
        frozen.train(mode)
        out = frozen(x)
        assert torch.equal(out, expected)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.equal(g, g_expected)
    # the formula written out
    y = (x - bn.running_mean.view(1, -1, *[1] * (x.dim() - 2))) / torch.sqrt(
        bn.running_var.view(1, -1, *[1] * (x.dim() - 2)) + bn.eps
    ) * bn.weight.view(1, -1, *[1] * (x.dim() - 2)) + bn.bias.view(1, -1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(frozen(x), y)


@pytest.mark.parametrize(
    "kw", [{"affine": False}, {"track_running_stats": False}], ids=["no-affine", "no-stats"]
)
def test_variants_match_eval_mode(kw: dict) -> None:
    bn = _trained(nn.BatchNorm2d, (4, 3, 5, 5), "cpu", torch.float32, **kw)
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(frozen(x), bn(x))
    assert sorted(frozen.state_dict()) == sorted(bn.state_dict())


def test_buffers_not_parameters_and_state_dict_round_trip() -> None:
    bn = _trained(nn.BatchNorm2d, (4, 3, 5, 5), "cpu", torch.float32)
    frozen = FrozenBatchNorm2d(3)
    assert list(frozen.parameters()) == []
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(frozen(x), bn(x))
    fresh = nn.BatchNorm2d(3).eval()
    fresh.load_state_dict(frozen.state_dict())
    assert torch.equal(fresh(x), bn(x))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()(torch.randn(8, 3, 5, 5))
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_from_batchnorm_shares_storage() -> None:
    bn = nn.BatchNorm1d(3)
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    assert frozen.weight.data_ptr() == bn.weight.data_ptr()
    assert frozen.running_mean is bn.running_mean
    assert not frozen.weight.requires_grad


def test_other_batchnorm_subclasses_get_the_rank_agnostic_class() -> None:
    sync = nn.SyncBatchNorm(3).eval()
    frozen = FrozenBatchNorm.from_batchnorm(sync)
    assert type(frozen) is FrozenBatchNorm
    x = torch.randn(2, 3, 4)
    assert torch.equal(
        frozen(x),
        nn.functional.batch_norm(
            x, sync.running_mean, sync.running_var, sync.weight, sync.bias, False, 0.0, sync.eps
        ),
    )


def test_input_checks_and_bad_modules() -> None:
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: expected 4D input \(got 3D input\)"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="FrozenBatchNorm1d: expected 2D or 3D input"):
        FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="FrozenBatchNorm: expected at least 2D input"):
        FrozenBatchNorm(3)(torch.randn(3))
    with pytest.raises(TypeError, match="from_batchnorm: bn must be a BatchNorm layer, got Linear"):
        FrozenBatchNorm.from_batchnorm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="LazyBatchNorm2d is lazy and not initialized"):
        FrozenBatchNorm.from_batchnorm(nn.LazyBatchNorm2d())
