"""gradlab.curvature._probes: Rademacher draws and the chunks Hutchinson's estimators use."""

from __future__ import annotations

import math

import pytest
import torch

import gradlab as gl
from gradlab.curvature import _probes
from gradlab.curvature._probes import rademacher, rademacher_chunks

# below _LOOKUP entries: randint; from it on: random bytes and the sign table (a tail that
# fills neither a byte nor a 7-byte word included)
SHAPES = {"randint": (3, 50), "bytes": (4, 40_001), "bytes-3d": (2, 57, 101)}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_rademacher_signs_are_independent_and_uniform(shape, device):
    g = torch.Generator(device=device).manual_seed(0)
    z = rademacher(shape, g, torch.float64, torch.device(device))
    assert z.shape == shape and z.dtype == torch.float64 and z.is_contiguous()
    z = z.reshape(-1)
    assert bool((z.abs() == 1).all())
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())  # 4 standard errors
    # neighbours within a byte, across bytes and across the 56-bit words: uncorrelated
    for lag in [*range(1, 10), 55, 56, 57, 64]:
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 4 / math.sqrt(z.numel() - lag)
    g2 = torch.Generator(device=device).manual_seed(0)  # the same seed, the same signs
    assert torch.equal(rademacher(shape, g2, torch.float64, torch.device(device)).reshape(-1), z)


def test_rademacher_bytes_are_the_generators_bits(device):
    # the signs, rebuilt one by one in Python from the same generator's int64 draws
    numel = _probes._LOOKUP + 61  # not a whole number of bytes or words
    g = torch.Generator(device=device).manual_seed(3)
    z = rademacher((numel,), g, torch.float32, torch.device(device)).tolist()
    g = torch.Generator(device=device).manual_seed(3)
    words = math.ceil(math.ceil(numel / 8) / 7)
    raw = torch.randint(0, 1 << 56, (words,), generator=g, dtype=torch.int64, device=device)
    expected = [
        2.0 * ((w >> (8 * j + k)) & 1) - 1.0
        for w in raw.tolist()
        for j in range(7)
        for k in range(8)
    ]
    assert z == expected[:numel]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_dtypes(dtype, device):
    for shape in SHAPES.values():
        g = torch.Generator(device=device).manual_seed(1)
        z = rademacher(shape, g, dtype, torch.device(device))
        assert z.dtype == dtype and z.device.type == torch.device(device).type
        assert bool((z.abs() == 1).all())


def test_rademacher_chunks_split_one_draw_per_chunk_into_parameter_views(device):
    a = torch.zeros(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, device=device, requires_grad=True)
    H = gl.hessian_operator(lambda: (a**2).sum() + (b**4).sum(), [a, b])
    H._chunk = 4  # 10 vectors: chunks of 4, 4, 2
    chunks, vectors = rademacher_chunks(H, 10, seed=7)
    assert chunks == 3
    pieces = [vectors(c) for c in range(chunks)]
    assert [[tuple(p.shape) for p in V] for V in pieces] == [
        [(4, 3, 4), (4, 5)],
        [(4, 3, 4), (4, 5)],
        [(2, 3, 4), (2, 5)],
    ]
    g = torch.Generator(device=device).manual_seed(7)
    for V in pieces:  # each chunk: one draw of (rows, n), split by parameter
        rows = V[0].shape[0]
        flat = rademacher((rows, 17), g, torch.float64, torch.device(device))
        torch.testing.assert_close(torch.cat([v.reshape(rows, -1) for v in V], 1), flat)
    again = [vectors(c) for c in range(chunks)]  # reseeded at chunk 0: the same vectors
    assert all(torch.equal(u, v) for U, W in zip(pieces, again) for u, v in zip(U, W))


def test_hutchinson_trace_and_diagonal_with_the_new_probes(device):
    # exact for a diagonal Hessian (z^T D z = tr D and z * D z = diag D for signs z)
    w = torch.linspace(-1.0, 2.0, 9000, dtype=torch.float64, device=device).requires_grad_()
    d = 12 * w.detach() ** 2

    def loss():
        return (w**4).sum()

    torch.testing.assert_close(
        gl.hessian_trace(loss, w, samples=3, generator=0), d.sum(), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        gl.hessian_diagonal(loss, w, samples=2, generator=0), d, rtol=1e-12, atol=0
    )
    # H = 2 * ones + D: unbiased (E (sum z)^2 = n), reproducible from a seed
    n = w.numel()

    def coupled():
        return w.sum() ** 2 + (w**4).sum()

    est = gl.hessian_trace(coupled, w, samples=16, generator=4)
    sd = 2 * math.sqrt((2 * n * n - 2 * n) / 16)  # of 2 * mean((sum z)^2)
    assert abs(float(est) - float(d.sum() + 2 * n)) < 4 * sd
    assert torch.equal(est, gl.hessian_trace(coupled, w, samples=16, generator=4))
    assert not torch.equal(est, gl.hessian_trace(coupled, w, samples=16, generator=5))
