"""gradlab.curvature._layers: layer inputs laid out as rows, against torch's own unfold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.curvature._layers import _unfold, input_rows

CONVS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, stride=(3, 2), padding=(2, 1), dilation=2),
    dict(kernel_size=1),
    dict(kernel_size=5),  # the kernel covers the whole input: one position
]


@pytest.mark.parametrize("options", CONVS, ids=["s2p1", "rect-dil", "big-pad-dil", "1x1", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_unfold_is_torch_unfold(options, layout, device):
    """The patches equal ``F.unfold``'s exactly (a copy of the same entries), whatever the
    input's memory layout."""
    conv = nn.Conv2d(3, 4, **options)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 7, generator=g).to(device)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        a = a.transpose(2, 3).contiguous().transpose(2, 3)
    expected = nn.functional.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(_unfold(conv, a), expected)
    assert torch.equal(input_rows(conv, a), expected.transpose(1, 2))
