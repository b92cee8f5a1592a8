"""Properties over random target sets: freeze covers exactly the names a hand-written prefix rule
picks, frozen() is an exact round trip, and freeze + unfreeze of everything restores the model."""

from __future__ import annotations

import fnmatch

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradlab.finetune import freeze, frozen, unfreeze
from tests.finetune._nets import TinyResNet

MODEL = TinyResNet()
MODULE_NAMES = [n for n, _ in MODEL.named_modules() if n]
PARAM_NAMES = [n for n, _ in MODEL.named_parameters()]
GLOBS = ["layer*.0", "*.bn1", "*.weight", "layer2.*.conv2", "fc.bias", "*downsample*"]
targets = st.lists(st.sampled_from(MODULE_NAMES + PARAM_NAMES + GLOBS), min_size=1, max_size=4)
modes = st.sampled_from(["eval", "frozen", "train"])


def _expected_frozen(names: list[str]) -> set[str]:
    """Reference: a parameter is covered if a pattern matches its name or a module prefix."""
    out = set()
    for p in PARAM_NAMES:
        parts = p.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(x, pat) for pat in names for x in prefixes):
            out.add(p)
    return out


def _fingerprint(model: nn.Module) -> list[object]:
    return [
        [(n, p.requires_grad, id(p), p.grad is None) for n, p in model.named_parameters()],
        [(n, type(m).__name__, m.training, len(m._forward_pre_hooks), sorted(m.__dict__))
         for n, m in model.named_modules()],
    ]  # fmt: skip


@given(names=targets, mode=modes)
def test_freeze_covers_exactly_the_prefix_rule(names: list[str], mode: str) -> None:
    model = TinyResNet()
    freeze(model, *names, batchnorm=mode)
    got = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name, module in model.named_modules():  # swapped-out BatchNorms hold their parameters
        original = module.__dict__.get("_gradlab_original")
        if original is not None:
            got |= {f"{name}.{n}" for n, p in original.named_parameters() if not p.requires_grad}
    assert got == _expected_frozen(names)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(isinstance(m, nn.Module) and "train" not in m.__dict__ for m in model.modules())


@given(names=targets, mode=modes, train=st.booleans(), pre=st.sampled_from(["", "layer1", "fc"]))
def test_frozen_is_an_exact_round_trip(names: list[str], mode: str, train: bool, pre: str) -> None:
    model = TinyResNet().train(train)
    if pre:
        freeze(model, pre)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    before = _fingerprint(model)
    with frozen(model, *names, batchnorm=mode):
        assert (
            _expected_frozen(names) & {n for n, p in model.named_parameters() if p.requires_grad}
            == set()
        )
    assert _fingerprint(model) == before
