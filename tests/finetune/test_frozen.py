"""frozen(): temporary freezing restores every flag, gradient and mode, exceptions included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.finetune import FrozenBatchNorm, freeze, frozen
from gradlab.finetune._batchnorm import is_pinned
from tests.finetune._nets import TinyResNet, images


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad) for n, p in model.named_parameters()],
        "modes": [(n, type(m), m.training) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "dicts": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
    }


@pytest.mark.parametrize("batchnorm", ["eval", "frozen", "train"])
def test_restores_everything_after_an_exception(batchnorm: str) -> None:
    model = TinyResNet().train()
    model.layer1[1].eval()  # a mixed set of modes
    model.layer2[0].conv2.weight.requires_grad_(False)  # and of flags
    model(images()).sum().backward()
    model.layer2[0].conv2.weight.grad = None
    before = _snapshot(model)
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    with (
        pytest.raises(RuntimeError, match="boom"),
        frozen(model, "layer1", "bn1", batchnorm=batchnorm),
    ):
        assert not any(p.requires_grad for p in model.layer1.parameters())
        assert all(p.grad is None for p in model.layer1.parameters())
        if batchnorm == "frozen":
            assert isinstance(model.bn1, FrozenBatchNorm)
        elif batchnorm == "eval":
            assert not model.bn1.training
        raise RuntimeError("boom")
    after = _snapshot(model)
    assert after == before
    for n, p in model.named_parameters():
        assert p.grad is grads_before[n], n  # the very same gradient tensors


def test_keeps_earlier_freezes() -> None:
    model = TinyResNet().train()
    freeze(model, "layer1")
    with frozen(model):
        pass
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert is_pinned(model.layer1[0].bn1) and not is_pinned(model.layer2[0].bn1)
    model.train()
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training


def test_mode_change_inside_block_is_kept_as_the_request() -> None:
    model = TinyResNet().train()
    with frozen(model):
        model.eval()
    assert all(not m.training for m in model.modules())


def test_gan_pattern_discriminator_untouched_while_generator_steps(device: torch.device) -> None:
    gen = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).to(device)
    disc = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).to(device)
    g_opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    real = torch.randn(16, 4, device=device)
    for _ in range(3):
        # discriminator step
        d_opt.zero_grad(set_to_none=False)
        fake = gen(torch.randn(16, 3, device=device)).detach()
        (disc(fake).mean() - disc(real).mean()).backward()
        d_opt.step()
        # generator step: the discriminator is frozen, even if d_opt.step() is called by mistake
        d_before = {k: v.clone() for k, v in disc.state_dict().items()}
        g_before = [p.detach().clone() for p in gen.parameters()]
        with frozen(disc):
            g_opt.zero_grad(set_to_none=False)
            (-disc(gen(torch.randn(16, 3, device=device))).mean()).backward()
            g_opt.step()
            d_opt.step()
        for k, v in disc.state_dict().items():
            assert torch.equal(v, d_before[k]), k
        assert all(not torch.equal(p, q) for p, q in zip(gen.parameters(), g_before))
        assert all(p.requires_grad for p in disc.parameters()) and disc[1].training


def test_errors_are_raised_on_entry_with_nothing_changed() -> None:
    model = TinyResNet()
    with pytest.raises(ValueError, match="frozen: target 'layer9'"), frozen(model, "layer9"):
        pass
    with pytest.raises(ValueError, match="frozen: batchnorm must be one of"):
        with frozen(model, batchnorm="off"):
            pass
    assert all(p.requires_grad for p in model.parameters())
