"""The per-sample gradients' output buffers (huge pages on Linux where asked for): what is written
is what is read, at the sizes where the advice is given and below them."""

from __future__ import annotations

import pytest
import torch

from gradlab.per_sample import _alloc
from gradlab.per_sample._linear import seq_grad

TOL64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("numel", [7, 3 * (1 << 20) + 5], ids=["small", "above_the_threshold"])
def test_empty_is_an_ordinary_writable_tensor(numel: int, device) -> None:
    t = _alloc.empty((numel,), dtype=torch.float64, device=device)
    assert (t.shape, t.dtype, t.device.type) == ((numel,), torch.float64, device.type)
    assert t.is_contiguous() and t.numel() * t.element_size() == 8 * numel
    values = torch.arange(numel, dtype=torch.float64, device=device)
    t.copy_(values)
    assert torch.equal(t, values)
    assert torch.equal(t.clone(), values)  # an ordinary storage: copies, frees as usual


@pytest.mark.parametrize("t", [1, 3], ids=["outer_product", "batched_product"])
def test_seq_grad_in_a_large_buffer(t: int, device) -> None:
    """``(4, 1, 512, 300)`` float64, 4.7 MiB: above the size where huge pages are asked for."""
    a = torch.randn(4, 1, t, 300, dtype=torch.float64, device=device)
    d = torch.randn(4, 1, t, 512, dtype=torch.float64, device=device)
    assert 4 * 512 * 300 * 8 >= _alloc._MIN_BYTES
    want = torch.einsum("bgto,bgti->bgoi", d, a)  # sum_t d_t a_t^T, written out
    torch.testing.assert_close(seq_grad(a, d), want, **TOL64)


def test_seq_grad_of_non_contiguous_inputs() -> None:
    a = torch.randn(3, 2, 4, 5, dtype=torch.float64).transpose(2, 3)  # (3, 2, 5, 4) strided
    d = torch.randn(3, 2, 6, 5, dtype=torch.float64).transpose(2, 3)
    want = torch.einsum("bgto,bgti->bgoi", d, a)
    torch.testing.assert_close(seq_grad(a, d), want, **TOL64)


@pytest.mark.parametrize("t", [1, 3], ids=["outer_product", "batched_product"])
def test_seq_grad_stays_differentiable(t: int) -> None:
    """Called on tensors that require gradients (outside the engine), the per-sample gradients
    are differentiable in ``a`` and ``d`` (float64 gradcheck)."""
    a = torch.randn(2, 1, t, 3, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 1, t, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seq_grad, (a, d))


@pytest.mark.parametrize("t", [1, 3], ids=["outer_product", "batched_product"])
@pytest.mark.parametrize("differentiable", [False, True])
def test_seq_grad_into_a_given_buffer(t: int, differentiable: bool) -> None:
    """``out=`` (a slice of a larger result, as the convolutions' chunks use it) receives the
    per-sample gradients, and is what is returned; the rest of the result is not touched."""
    a = torch.randn(3, 2, t, 5, dtype=torch.float64, requires_grad=differentiable)
    d = torch.randn(3, 2, t, 4, dtype=torch.float64, requires_grad=differentiable)
    result = torch.zeros(5, 2, 4, 5, dtype=torch.float64)
    part = result[1:4]
    got = seq_grad(a, d, out=part)
    assert got.data_ptr() == part.data_ptr()
    want = torch.einsum("bgto,bgti->bgoi", d, a)
    torch.testing.assert_close(result[1:4], want.detach(), **TOL64)
    assert not result[0].any() and not result[4].any()
