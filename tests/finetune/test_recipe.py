"""The fine-tuning recipe from the README, end to end on a ResNet-like model built in code:
freeze the pretrained backbone, replace fc, optimize the head only; only the head changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlab as gl
from tests.finetune._nets import TinyResNet, images, state


def _pretrained(device: torch.device) -> TinyResNet:
    model = TinyResNet(num_classes=5).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            model(images(device, 16)), torch.randint(0, 5, (16,), device=device)
        )
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("batchnorm", ["eval", "frozen"])
@pytest.mark.parametrize("build", ["trainable_parameters", "param_groups"])
def test_only_the_new_head_changes(device: torch.device, build: str, batchnorm: str) -> None:
    model = _pretrained(device)
    gl.freeze(model, batchnorm=batchnorm)  # the whole pretrained network
    old_fc = gl.replace_module(model, "fc", nn.Linear(8, 3).to(device))  # a new 3-class head
    if build == "trainable_parameters":
        opt = torch.optim.SGD(
            gl.trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-3
        )
    else:
        opt = torch.optim.AdamW(gl.param_groups(model, 0.05, weight_decay=1e-2))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.fc.parameters()
    }
    before = state(model)
    x = images(device, 32)
    y = torch.randint(0, 3, (32,), device=device)
    losses = []
    for _ in range(30):
        model.train()
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert losses[-1] < losses[0]
    assert old_fc.out_features == 5
    summary = gl.parameter_summary(model)
    assert summary.trainable == 8 * 3 + 3
