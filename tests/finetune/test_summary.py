"""parameter_summary: per-module counts and sizes that add up, printable table, notes."""

from __future__ import annotations

import pytest
from torch import nn

from gradlab.finetune import freeze, parameter_summary
from tests.finetune._nets import TiedLM, TinyResNet


def test_counts_match_a_hand_count() -> None:
    model = TinyResNet()
    freeze(model, "conv1", "bn1", "layer1")
    freeze(model, "layer2.1", batchnorm="frozen")
    summary = parameter_summary(model)
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["conv1", "bn1", "layer1", "layer2", "fc"]
    for name in rows:
        params = list(model.get_submodule(name).parameters())
        assert rows[name].trainable == sum(p.numel() for p in params if p.requires_grad)
        assert rows[name].frozen == sum(p.numel() for p in params if not p.requires_grad)
        assert rows[name].trainable_bytes == 4 * rows[name].trainable
    assert rows["layer1"].trainable == 0 and rows["fc"].frozen == 0
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert summary.trainable == sum(r.trainable for r in summary.rows)
    assert rows["bn1"].note == "eval-pinned"
    deep = {r.name: r for r in parameter_summary(model, max_depth=None).rows}
    assert deep["layer2.1.bn1"].note == "frozen-bn" and deep["layer2.1.bn1"].frozen == 0
    assert deep["layer1.0.conv1"].depth == 3


def test_tied_parameters_count_once_in_the_total() -> None:
    model = TiedLM()
    summary = parameter_summary(model)
    rows = {r.name: r for r in summary.rows}
    assert rows["embed"].trainable == rows["lm_head"].trainable == 66
    assert summary.trainable == sum(p.numel() for p in model.parameters())


def test_str_is_a_table_with_every_row() -> None:
    model = TinyResNet()
    freeze(model, "layer1")
    text = str(parameter_summary(model))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["module", "type", "trainable", "frozen"]
    assert any(line.startswith("layer1") and " Sequential " in line for line in lines)
    assert lines[-1].startswith("total") and len(lines) == 5 + 4
    assert "eval-pinned" not in text  # depth 1 hides the pinned BatchNorms inside layer1


def test_bad_max_depth() -> None:
    with pytest.raises(ValueError, match="parameter_summary: max_depth must be an int >= 1, got 0"):
        parameter_summary(nn.Linear(2, 2), max_depth=0)
