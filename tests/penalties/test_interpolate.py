"""interpolate: one coefficient per sample, shared by a sample's inputs, reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlab.penalties import interpolate


def test_one_coefficient_per_sample_broadcast_over_its_shape(device):
    real = torch.zeros(6, 3, 4, 4, device=device)
    fake = torch.ones(6, 3, 4, 4, device=device)
    x_hat = interpolate(real, fake, generator=torch.Generator().manual_seed(0))
    a = x_hat.flatten(1)
    assert torch.equal(a, a[:, :1].expand_as(a))  # constant within a sample
    assert len(set(a[:, 0].tolist())) == 6  # different across samples
    assert ((a >= 0) & (a < 1)).all()


def test_matches_documented_draw(device):
    real = torch.randn(5, 2, 3, device=device)
    fake = torch.randn(5, 2, 3, device=device)
    x_hat = interpolate(real, fake, generator=torch.Generator().manual_seed(9))
    a = torch.rand(5, generator=torch.Generator().manual_seed(9)).to(device).view(5, 1, 1)
    torch.testing.assert_close(x_hat, real + a * (fake - real))


def test_tuple_inputs_share_the_coefficient():
    real = (torch.zeros(4, 3), torch.zeros(4, 2, 2))
    fake = (torch.ones(4, 3), torch.full((4, 2, 2), 2.0))
    out = interpolate(real, fake, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, tuple) and len(out) == 2
    a0, a1 = out[0][:, 0], out[1][:, 0, 0] / 2
    torch.testing.assert_close(a0, a1)


def test_real_equal_fake_is_deterministic():
    x = torch.randn(3, 5)
    for seed in range(3):
        assert torch.equal(
            interpolate(x, x.clone(), generator=torch.Generator().manual_seed(seed)), x
        )


def test_differentiable_and_leaves_inputs_alone():
    real = torch.randn(3, 2, requires_grad=True)
    fake = torch.randn(3, 2)
    out = interpolate(real, fake)
    assert out.requires_grad and real.grad is None and not fake.requires_grad


def test_errors():
    with pytest.raises(
        ValueError,
        match=r"interpolate: fake must be of real\'s shape \(4, 3\), got tensor\(shape=\(4, 2\)",
    ):
        interpolate(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(
        ValueError,
        match=r"fake must be structured as real \(1 input\(s\), a Tensor\), got \(tensor",
    ):
        interpolate(torch.zeros(4, 3), (torch.zeros(4, 3), torch.zeros(4, 3)))
    with pytest.raises(
        ValueError,
        match=r"real\[1\] must be a tensor of real\[0\]'s batch size 4, got tensor\(shape=\(2,\)",
    ):
        interpolate((torch.zeros(4, 3), torch.zeros(2)), (torch.zeros(4, 3), torch.zeros(2)))
    with pytest.raises(
        ValueError, match=r"fake must be torch.float32 on cpu like real, got .*torch.float64"
    ):
        interpolate(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(
        ValueError,
        match=r"real must be a tensor with a leading batch dimension",
    ):
        interpolate(torch.tensor(1.0), torch.tensor(2.0))


@given(st.integers(1, 5), st.lists(st.integers(1, 3), max_size=3), st.integers(0, 1000))
def test_property_interpolate_lies_on_the_segment(batch, sample_shape, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(batch, *sample_shape, generator=g, dtype=torch.float64)
    fake = torch.randn(batch, *sample_shape, generator=g, dtype=torch.float64)
    x_hat = interpolate(real, fake, generator=g)
    assert x_hat.shape == real.shape
    d = (fake - real).reshape(batch, -1)
    t = ((x_hat - real).reshape(batch, -1) * d).sum(1) / (d * d).sum(1)
    torch.testing.assert_close((x_hat - real).reshape(batch, -1), t[:, None] * d)
    assert ((t >= 0) & (t <= 1)).all()
