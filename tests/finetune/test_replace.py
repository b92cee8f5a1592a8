"""replace_module: by dotted name, through Sequential indices, with clear errors."""

from __future__ import annotations

import pytest
from torch import nn

from gradlab.finetune import replace_module
from tests.finetune._nets import TinyResNet


def test_replaces_nested_and_indexed_modules() -> None:
    model = TinyResNet()
    old = model.layer2[1].conv2
    new = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    assert replace_module(model, "layer2.1.conv2", new) is old
    assert model.layer2[1].conv2 is new
    assert model.get_submodule("layer2.1.conv2") is new
    seq = nn.Sequential(nn.Linear(2, 2), nn.ModuleDict({"a": nn.ReLU()}))
    replace_module(seq, "1.a", nn.Tanh())
    assert isinstance(seq[1]["a"], nn.Tanh)


def test_missing_name_lists_close_names() -> None:
    model = TinyResNet()
    with pytest.raises(ValueError, match=r"no submodule 'layer2\.1\.fc'.*layer2\.1 has no child"):
        replace_module(model, "layer2.1.fc", nn.Identity())
    with pytest.raises(ValueError, match=r"closest names: 'fc'"):
        replace_module(model, "fcc", nn.Identity())


def test_bad_arguments() -> None:
    model = TinyResNet()
    with pytest.raises(ValueError, match="replace_module: name must be a non-empty module name"):
        replace_module(model, "", nn.Identity())
    with pytest.raises(TypeError, match="new_module must be a torch"):
        replace_module(model, "fc", lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a dotted module name"):
        replace_module(model, 3, nn.Identity())  # type: ignore[arg-type]
