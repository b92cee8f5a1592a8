"""freeze / unfreeze: frozen means frozen (optimizers built before, BatchNorm in train mode),
target matching (globs, types, objects, parameters, tied weights), no trace after unfreeze, errors.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gradlab as gl
from gradlab.finetune import FrozenBatchNorm2d, freeze, trainable_parameters, unfreeze
from tests.finetune._nets import TiedLM, TinyResNet, images, state

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, device: torch.device) -> None:
    for _ in range(steps):
        model.train()
        opt.zero_grad(set_to_none=False)
        model(images(device)).square().mean().backward()
        opt.step()


def _backbone(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("batchnorm", ["eval", "frozen"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_backbone_is_bit_identical_after_many_steps(
    device: torch.device, opt_name: str, batchnorm: str
) -> None:
    model = TinyResNet().to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())  # built before the freeze, over everything
    _train(model, opt, 3, device)  # momentum / Adam moments are non-zero now
    freeze(model, "conv1", "bn1", "layer1", "layer2", batchnorm=batchnorm)
    before = state(model)
    _train(model, opt, 25, device)
    after = state(model)
    assert set(before) == set(after)  # FrozenBatchNorm keeps the state_dict keys
    for name, value in _backbone(model, before).items():
        assert torch.equal(after[name], value), name
    assert not torch.equal(after["fc.weight"], before["fc.weight"])  # the head did train


@pytest.mark.parametrize("opt_name", ["sgd-momentum-wd", "adam"])
def test_requires_grad_false_alone_moves_parameters(device: torch.device, opt_name: str) -> None:
    """The control: what freeze guards against really happens without it."""
    model = TinyResNet().to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, opt, 3, device)
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    before = state(model)
    _train(model, opt, 5, device)
    after = state(model)
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_freeze_sets_flags_and_clears_grads() -> None:
    model = TinyResNet()
    model(images()).sum().backward()
    freeze(model, "layer1")
    for name, p in model.named_parameters():
        frozen_here = name.startswith("layer1.")
        assert p.requires_grad is not frozen_here, name
        assert (p.grad is None) is frozen_here, name


def test_eval_pin_survives_model_train_and_unfreeze_leaves_no_trace() -> None:
    model = TinyResNet().train()
    bn = model.layer1[0].bn1
    hooks_before = len(bn._forward_pre_hooks)
    freeze(model, "layer1")
    assert not bn.training and model.layer2[0].bn1.training
    model.train()
    assert model.training and not bn.training and model.layer2[0].bn1.training
    bn.training = True  # code that flips the flag directly: the forward pre-hook undoes it
    model(images())
    assert not bn.training
    model.eval()
    model.train()
    unfreeze(model, "layer1")
    assert bn.training  # the mode the last train()/eval() call asked for
    assert "train" not in bn.__dict__ and len(bn._forward_pre_hooks) == hooks_before
    model.eval()
    assert not bn.training
    model.train()
    assert bn.training


def test_eval_pin_restores_eval_mode_requested_while_pinned() -> None:
    model = TinyResNet().train()
    freeze(model)
    model.eval()
    unfreeze(model)
    assert all(not m.training for m in model.modules())


def test_train_mode_leaves_batchnorm_alone() -> None:
    model = TinyResNet().train()
    freeze(model, batchnorm="train")
    assert model.bn1.training and "train" not in model.bn1.__dict__
    before = model.bn1.running_mean.clone()
    model(images())
    assert not torch.equal(model.bn1.running_mean, before)


def test_frozen_mode_swaps_in_frozen_batchnorm_with_identical_outputs() -> None:
    model = TinyResNet().eval()
    _warm_statistics(model)
    x = images()
    expected = model(x)
    original = model.layer1[0].bn1
    params_before = list(model.parameters())
    freeze(model, batchnorm="frozen")
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.train()
    assert torch.equal(model(x), expected)  # train mode, same numbers as eval-mode BatchNorm
    unfreeze(model)
    assert model.layer1[0].bn1 is original
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert all(p.requires_grad for p in model.parameters())
    assert model.layer1[0].bn1.training  # model.train() was the last request


def _warm_statistics(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images())
    model.eval()


def test_frozen_mode_carries_device_and_dtype_moves_back() -> None:
    model = TinyResNet()
    _warm_statistics(model)
    freeze(model, "bn1", batchnorm="frozen")
    model.double()
    unfreeze(model, "bn1")
    assert model.bn1.weight.dtype == torch.float64
    assert model.bn1.running_mean.dtype == torch.float64
    model(images().double())


def test_pinned_and_swapped_models_deepcopy_and_pickle() -> None:
    model = TinyResNet()
    freeze(model, "layer1")
    freeze(model, "layer2", batchnorm="frozen")
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (clone, loaded):
        m.train()
        assert not m.layer1[0].bn1.training
        unfreeze(m)
        assert m.layer1[0].bn1.training and isinstance(m.layer2[0].bn1, nn.BatchNorm2d)
        assert all(p.requires_grad for p in m.parameters())


def test_targets_globs_types_objects_and_parameters() -> None:
    model = TinyResNet()

    def frozen_names() -> set[str]:
        return {n for n, p in model.named_parameters() if not p.requires_grad}

    freeze(model, "layer1.*.conv1")  # module glob covers the module's parameters
    assert frozen_names() == {"layer1.0.conv1.weight", "layer1.1.conv1.weight"}
    unfreeze(model)
    freeze(model, "*.bn2.weight")  # parameter glob, '*' crosses dots
    assert frozen_names() == {f"layer{i}.{j}.bn2.weight" for i in (1, 2) for j in (0, 1)}
    assert model.layer1[0].bn2.training  # a parameter glob does not pin the BatchNorm
    unfreeze(model)
    freeze(model, nn.Linear)
    assert frozen_names() == {"fc.weight", "fc.bias"}
    unfreeze(model)
    freeze(model, model.layer2[1])
    assert frozen_names() == {n for n, _ in model.named_parameters() if n.startswith("layer2.1.")}
    unfreeze(model, model.layer2[1].conv1)
    assert "layer2.1.conv1.weight" not in frozen_names()
    unfreeze(model)
    freeze(model, model.conv1.weight, "fc.bias")
    assert frozen_names() == {"conv1.weight", "fc.bias"}
    unfreeze(model)
    freeze(model)
    assert frozen_names() == {n for n, _ in model.named_parameters()}


def test_type_and_object_targets_match_swapped_batchnorm() -> None:
    model = TinyResNet()
    original = model.bn1
    freeze(model, nn.BatchNorm2d, batchnorm="frozen")
    unfreeze(model, original)
    assert model.bn1 is original and original.weight.requires_grad
    unfreeze(model, nn.BatchNorm2d)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["embed", "lm_head", "lm_head.weight", "embed.weight"])
def test_tied_weights_match_through_any_name(name: str) -> None:
    model = TiedLM()
    freeze(model, name)
    assert not model.embed.weight.requires_grad and model.lm_head.weight is model.embed.weight
    assert model.body.weight.requires_grad
    assert len(trainable_parameters(model)) == 4  # body.weight/bias, norm.weight/bias


def test_tied_weight_frozen_stays_bit_identical() -> None:
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 11, (4, 5))
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    freeze(model, "lm_head")
    before = model.embed.weight.detach().clone()
    for _ in range(10):
        opt.zero_grad(set_to_none=False)
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    assert torch.equal(model.embed.weight, before)


def test_trainable_parameters_are_unique_and_in_order() -> None:
    model = TiedLM()
    params = trainable_parameters(model)
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    freeze(model, "norm")
    assert all(p.requires_grad for p in trainable_parameters(model))
    assert len(trainable_parameters(model)) == 3


def test_top_level_names_are_the_same_objects() -> None:
    assert gl.freeze is freeze and gl.unfreeze is unfreeze
    assert gl.trainable_parameters is trainable_parameters


def test_pattern_matching_nothing_lists_close_names() -> None:
    model = TinyResNet()
    with pytest.raises(
        ValueError, match=r"freeze: target 'layer3'.*closest names: 'layer2', 'layer1'"
    ):
        freeze(model, "layer3")
    with pytest.raises(ValueError, match=r"unfreeze: target 'fc\.wieght'.*'fc\.weight'"):
        unfreeze(model, "fc.wieght")
    assert all(p.requires_grad for p in model.parameters())  # nothing half-done


def test_bad_targets_and_modes() -> None:
    model = TinyResNet()
    computed = model.fc.weight * 2
    with pytest.raises(ValueError, match=r"freeze: got a non-leaf tensor of shape \(5, 8\)"):
        freeze(model, computed)
    with pytest.raises(ValueError, match=r"the tensor of shape \(3,\) .* is not a parameter"):
        freeze(model, torch.zeros(3, requires_grad=True))
    with pytest.raises(ValueError, match="freeze: batchnorm must be one of 'eval', 'frozen'"):
        freeze(model, batchnorm="fixed")
    with pytest.raises(ValueError, match="no module of type LayerNorm"):
        freeze(model, nn.LayerNorm)
    with pytest.raises(ValueError, match="Linear object passed as a target is not a submodule"):
        freeze(model, nn.Linear(2, 2))
    with pytest.raises(
        TypeError, match=(r"freeze: each target must be a na" r"me glob \(str\), .* got 3\. Pass")
    ):
        freeze(model, 3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=(r"a type target must be a torch\.nn\." r"Module subclass, got <class 'int'>"),
    ):
        freeze(model, int)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=(r"freeze: model must be a torch\." r"nn\.Module, got \[tensor\(shape=")
    ):
        freeze(list(model.parameters()))  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
