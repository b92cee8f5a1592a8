"""Module selection by name globs."""

from __future__ import annotations

import pytest
from torch import nn

from gradlab.hooks._select import select_modules


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
        nn.Linear(2, 1),
    )


def test_default_is_every_leaf_in_order() -> None:
    assert [n for n, _ in select_modules("f", _net(), ())] == ["0.0", "0.1", "1.0", "1.1", "2"]
    lin = nn.Linear(2, 2)
    assert select_modules("f", lin, ()) == [("", lin)]  # a leaf model is selected as ""


def test_globs_in_registration_order_without_duplicates() -> None:
    net = _net()
    names = [n for n, _ in select_modules("f", net, ("2", "*.0", "0.?"))]
    assert names == ["0.0", "0.1", "1.0", "2"]
    assert [n for n, _ in select_modules("f", net, ("1",))] == ["1"]  # containers too


def test_no_match_lists_module_names() -> None:
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(
        ValueError,
        match=r"f: pattern 'fc\*' matches no module of Sequential; "
        r"module names are '0', '1', .*'7' and 4 more\. Use one of",
    ):
        select_modules("f", net, ("fc*",))
    with pytest.raises(
        TypeError,
        match=r"f: patterns must be module-name glob strings, got "
        r"Linear",
    ):
        select_modules("f", net, (nn.Linear(1, 1),))  # type: ignore[arg-type]
