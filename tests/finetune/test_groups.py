"""param_groups: real lrs, layer decay by depth, discriminative multipliers, no decay on biases and
norms, no duplicates, no frozen parameters, torch's LR schedulers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gradlab.finetune import freeze, param_groups
from tests.finetune._nets import TiedLM, TinyResNet, images


def _lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def _wd_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


class ToyViT(nn.Module):
    """timm-like names: cls_token, patch_embed, blocks.i, norm, head."""

    def __init__(self, depth: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)


def test_layer_decay_on_resnet_names_gives_real_lrs_by_depth() -> None:
    model = TinyResNet()
    lr, d = 0.1, 0.5
    groups = param_groups(model, lr, layer_decay=d)
    lrs = _lr_of(groups)
    depth = {"layer1.0": 1, "layer1.1": 2, "layer2.0": 3, "layer2.1": 4}  # stem 0, head 5
    for name, p in model.named_parameters():
        block = ".".join(name.split(".")[:2])
        k = 0 if name.startswith(("conv1", "bn1")) else 5 if name.startswith("fc") else depth[block]
        assert lrs[id(p)] == pytest.approx(lr * d ** (5 - k), rel=1e-12), name
    assert lrs[id(model.fc.weight)] == lr
    chain = ["conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight",
             "layer2.0.conv1.weight", "layer2.1.conv1.weight", "fc.weight"]  # fmt: skip
    params = dict(model.named_parameters())
    values = [lrs[id(params[n])] for n in chain]
    assert all(a < b for a, b in itertools.pairwise(values))  # strictly decreasing with depth


def test_layer_decay_on_vit_names() -> None:
    model = ToyViT(depth=4)
    groups = param_groups(model, 1.0, layer_decay=0.5)
    lrs = _lr_of(groups)
    assert lrs[id(model.cls_token)] == lrs[id(model.patch_embed.weight)] == 0.5**5
    for i, block in enumerate(model.blocks):
        assert all(lrs[id(p)] == 0.5 ** (4 - i) for p in block.parameters())
    assert lrs[id(model.norm.weight)] == lrs[id(model.head.weight)] == 1.0


def test_explicit_layers_order_last_match_wins() -> None:
    model = ToyViT(depth=2)
    groups = param_groups(
        model, 1.0, layer_decay=0.1, layers=["*", ["blocks.0"], "blocks.1", ["norm", "head"]]
    )
    lrs = _lr_of(groups)
    assert lrs[id(model.cls_token)] == pytest.approx(1e-3)
    assert lrs[id(model.blocks[0][1].weight)] == pytest.approx(1e-2)
    assert lrs[id(model.blocks[1][1].weight)] == pytest.approx(1e-1)
    assert lrs[id(model.head.bias)] == 1.0


def test_discriminative_multipliers_last_match_wins() -> None:
    model = TinyResNet()
    groups = param_groups(model, 0.01, groups={"*": 0.1, "layer2.*": 0.5, "fc": 1.0})
    lrs = _lr_of(groups)
    for name, p in model.named_parameters():
        expected = 0.01 if name.startswith("fc") else 0.005 if name.startswith("layer2") else 0.001
        assert lrs[id(p)] == pytest.approx(expected, rel=1e-12), name


def test_multipliers_compose_with_layer_decay() -> None:
    model = TinyResNet()
    lrs = _lr_of(param_groups(model, 1.0, groups={"layer1": 0.1}, layer_decay=0.5))
    assert lrs[id(model.layer1[0].conv1.weight)] == pytest.approx(0.1 * 0.5**4)
    assert lrs[id(model.layer2[0].conv1.weight)] == pytest.approx(0.5**2)


class MyRMSNorm(nn.Module):  # detected by class name
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


def test_no_weight_decay_on_biases_and_norm_layers() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), MyRMSNorm(4)
    )
    model.add_module("gn", nn.GroupNorm(2, 4))
    wd = _wd_of(param_groups(model, 1e-3, weight_decay=0.05))
    decayed = {n for n, p in model.named_parameters() if wd[id(p)] == 0.05}
    assert decayed == {"0.weight", "2.weight"}
    wd = _wd_of(param_groups(model, 1e-3, weight_decay=0.05, no_weight_decay=()))
    assert set(wd.values()) == {0.05}
    wd = _wd_of(param_groups(model, 1e-3, weight_decay=0.05, no_weight_decay=("0.*",)))
    assert {n for n, p in model.named_parameters() if wd[id(p)] == 0.0} == {"0.weight", "0.bias"}


def test_no_duplicates_no_frozen_and_every_trainable_once() -> None:
    model = TiedLM()
    freeze(model, "norm")
    groups = param_groups(model, 1e-3, layer_decay=0.7, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert id(model.norm.weight) not in ids
    torch.optim.AdamW(groups)  # torch accepts them (it refuses duplicates across groups)


@pytest.mark.parametrize("scheduler", ["step", "onecycle", "plateau", "cosine"])
def test_works_with_torch_schedulers(scheduler: str) -> None:
    model = TinyResNet()
    groups = param_groups(model, 0.1, layer_decay=0.5, weight_decay=1e-4)
    initial = [g["lr"] for g in groups]
    opt = torch.optim.SGD(groups, lr=123.0, momentum=0.9)  # the groups' lrs win over the default
    assert [g["lr"] for g in opt.param_groups] == initial
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    elif scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    elif scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=initial, total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(5):
        opt.zero_grad()
        model(images()).square().mean().backward()
        opt.step()
        sched.step(1.0) if scheduler == "plateau" else sched.step()  # type: ignore[func-returns-value]
    now = [g["lr"] for g in opt.param_groups]
    assert now != initial  # the scheduler moved them
    ratios = [a / b for a, b in zip(now, initial)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-9)  # ... keeping the ratios


def test_bad_input() -> None:
    model = TinyResNet()
    with pytest.raises(ValueError, match=r"param_groups: groups pattern 'backbone\.\*' matches"):
        param_groups(model, 0.1, groups={"backbone.*": 0.1})
    with pytest.raises(ValueError, match="closest names: 'layer1'"):
        param_groups(model, 0.1, groups={"layer_1": 0.1})
    with pytest.raises(
        ValueError, match=r"layer_decay must be a finite number in \(0, 1\], got 1.5"
    ):
        param_groups(model, 0.1, layer_decay=1.5)
    with pytest.raises(
        ValueError, match=r"layer_decay must be a finite number in \(0, 1\], got 0.0"
    ):
        param_groups(model, 0.1, layer_decay=0.0)
    with pytest.raises(
        ValueError, match=r"param_groups: lr must be a finite number >= 0, got -1\.0"
    ):
        param_groups(model, -1.0)
    with pytest.raises(ValueError, match="layers orders the depths for layer_decay"):
        param_groups(model, 0.1, layers=["conv1"])
    with pytest.raises(ValueError, match=r"layers covers no entry for .* \('bn1.weight'"):
        param_groups(model, 0.1, layer_decay=0.5, layers=["conv1", "layer*", "fc"])
    with pytest.raises(TypeError, match="no_weight_decay must be a sequence of globs"):
        param_groups(model, 0.1, no_weight_decay="bias")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"param_groups: model must be a torch\.nn\.Module"):
        param_groups([nn.Parameter(torch.ones(1))], 0.1)  # type: ignore[arg-type]
