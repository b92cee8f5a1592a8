"""Path length penalty (StyleGAN2) against the formula with a per-sample loop; the EMA state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlab import GraphError
from gradlab.penalties import PathLengthPenalty, path_length_penalty


class _Synthesis(nn.Module):
    """w (B, 8) -> images (B, 3, 4, 4), nonlinear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3 * 4 * 4)

    def forward(self, w):
        return torch.tanh(self.fc(w)).view(-1, 3, 4, 4)


def _setup(device="cpu"):
    torch.manual_seed(0)
    g = _Synthesis().double().to(device)
    w = torch.randn(5, 8, dtype=torch.float64, device=device)
    return g, w


def _hand(g, w, seed, prev, decay, weight):
    y = torch.randn((5, 3, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=w.dtype)
    y = y.to(w.device) / math.sqrt(4 * 4)
    lengths = []
    for i in range(w.shape[0]):
        wi = w[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad((g(wi) * y[i : i + 1]).sum(), wi, create_graph=True)
        lengths.append((gi**2).sum().sqrt())
    lengths = torch.stack(lengths)
    mean = prev + decay * (lengths.mean() - prev)
    return weight * ((lengths - mean) ** 2).mean(), lengths, mean


def test_matches_hand_formula_and_parameter_gradient(device):
    g, w = _setup(device)
    wl = w.clone().requires_grad_(True)
    out = path_length_penalty(
        g(wl), wl, mean=0.3, decay=0.1, weight=2.0, generator=torch.Generator().manual_seed(3)
    )
    want, lengths, mean = _hand(g, w, 3, 0.3, 0.1, 2.0)
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.lengths, lengths.detach())
    torch.testing.assert_close(out.mean.double(), mean.detach(), rtol=1e-6, atol=0)
    assert out.lengths.grad_fn is None and out.mean.grad_fn is None
    got = torch.autograd.grad(out.penalty, list(g.parameters()))
    ref = torch.autograd.grad(want, list(g.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert wl.grad is None and all(p.grad is None for p in g.parameters())


def test_linear_generator_has_constant_expected_length():
    """images = A w: J^T y = A^T y, the same matrix for every sample."""
    a = torch.randn(48, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = path_length_penalty(
        (w @ a.T).view(4, 3, 4, 4), w, mean=0.0, generator=torch.Generator().manual_seed(0)
    )
    y = (
        torch.randn((4, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        / 4
    )
    torch.testing.assert_close(out.lengths, (y.view(4, 48) @ a).norm(dim=1))


def test_stateful_module_updates_the_ema_and_round_trips_state_dict():
    g, w = _setup()
    pl = PathLengthPenalty(decay=0.01, weight=2.0)
    means = [0.0]
    for step in range(3):
        wl = w.clone().requires_grad_(True)
        penalty = pl(g(wl), wl, generator=torch.Generator().manual_seed(step))
        want, _, mean = _hand(g, w, step, means[-1], 0.01, 2.0)
        torch.testing.assert_close(penalty, want, rtol=1e-6, atol=1e-9)
        means.append(mean.item())
        assert pl.last_lengths is not None and pl.last_lengths.shape == (5,)
    assert pl.mean.item() == pytest.approx(means[-1], rel=1e-6)
    assert means[1] == pytest.approx(0.01 * pl.last_lengths.mean().item(), rel=0.5)  # EMA from 0
    restored = PathLengthPenalty()
    restored.load_state_dict(pl.state_dict())
    assert torch.equal(restored.mean, pl.mean)
    assert "decay=0.01, weight=2.0" in repr(pl)


def test_errors():
    g, w = _setup()
    wl = w.clone().requires_grad_(True)
    with pytest.raises(
        ValueError, match=r"path_length_penalty: latents must be a tensor that requires grad"
    ):
        path_length_penalty(g(w), w, mean=0.0)
    with pytest.raises(ValueError, match=r"path_length_penalty: images has shape \(5, 48\)"):
        path_length_penalty(g(wl).flatten(1), wl, mean=0.0)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 2.0"):
        path_length_penalty(g(wl), wl, mean=0.0, decay=2.0)
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0"):
        PathLengthPenalty(weight=-2.0)
    with pytest.raises(TypeError, match=r"path_length_penalty: mean must be a float or a 0-d"):
        path_length_penalty(g(wl), wl, mean=None)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"images do not depend on latents"):
        path_length_penalty(g(wl), wl.clone().detach().requires_grad_(True), mean=0.0)


class _StyleSynthesis(nn.Module):
    """ws (B, num_ws, w_dim) -> images (B, 3, 4, 4): each layer k sees its own w_k (as
    StyleGAN2's synthesis layers do), so the per-layer gradients differ."""

    def __init__(self, num_ws: int = 3, w_dim: int = 5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w_dim, 48) for _ in range(num_ws))

    def forward(self, ws):
        x = sum(torch.tanh(layer(ws[:, k])) * (k + 1) for k, layer in enumerate(self.layers))
        return x.view(-1, 3, 4, 4)


def _stylegan2_ada_pl(images, ws, seed, pl_mean, pl_decay, pl_weight):
    """StyleGAN2-ADA's loss.py (accumulate_gradients, phase Gpl), written out."""
    gen = torch.Generator().manual_seed(seed)  # randn_like(gen_img), seeded
    pl_noise = torch.randn(images.shape, generator=gen, dtype=images.dtype) / math.sqrt(
        images.shape[2] * images.shape[3]
    )
    (pl_grads,) = torch.autograd.grad(
        outputs=[(images * pl_noise).sum()], inputs=[ws], create_graph=True, only_inputs=True
    )
    pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
    pl_mean = torch.as_tensor(pl_mean, dtype=pl_lengths.dtype).lerp(pl_lengths.mean(), pl_decay)
    pl_penalty = (pl_lengths - pl_mean).square()
    return (pl_penalty * pl_weight).mean(), pl_lengths, pl_mean


def test_3d_latents_follow_stylegan2_ada_exactly():
    torch.manual_seed(0)
    synthesis = _StyleSynthesis().double()
    w = torch.randn(4, 5, dtype=torch.float64)
    ws = w.unsqueeze(1).repeat(1, 3, 1).requires_grad_(True)  # broadcast, as the mapping does
    images = synthesis(ws)
    out = path_length_penalty(
        images, ws, mean=0.4, decay=0.01, weight=2.0, generator=torch.Generator().manual_seed(2)
    )
    want, lengths, mean = _stylegan2_ada_pl(synthesis(ws), ws, 2, 0.4, 0.01, 2.0)
    torch.testing.assert_close(out.lengths, lengths.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.mean.double(), mean.detach(), rtol=1e-12, atol=0)
    got = torch.autograd.grad(out.penalty, list(synthesis.parameters()))
    ref = torch.autograd.grad(want, list(synthesis.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the un-broadcast (B, w_dim) latents give a different quantity (documented)
    wl = w.clone().requires_grad_(True)
    other = path_length_penalty(
        synthesis(wl.unsqueeze(1).repeat(1, 3, 1)),
        wl,
        mean=0.4,
        generator=torch.Generator().manual_seed(2),
    )
    assert not torch.allclose(other.lengths, out.lengths, rtol=0.05)


def test_2d_latents_unchanged_and_more_than_3d_refused():
    g, w = _setup()
    wl = w.clone().requires_grad_(True)
    out = path_length_penalty(g(wl), wl, mean=0.0, generator=torch.Generator().manual_seed(1))
    _, lengths, _ = _hand(g, w, 1, 0.0, 0.01, 2.0)
    torch.testing.assert_close(out.lengths, lengths.detach())
    w4 = torch.randn(2, 1, 2, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"latents has shape \(2, 1, 2, 8\); it must be"):
        path_length_penalty(g(w4[:, 0, 0]), w4, mean=0.0)


def test_nan_batch_leaves_the_mean_and_the_next_batch_finite():
    g, w = _setup()
    pl = PathLengthPenalty(decay=0.5)
    wl = w.clone().requires_grad_(True)
    pl(g(wl), wl, generator=torch.Generator().manual_seed(0))
    mean_before = pl.mean.clone()
    assert mean_before > 0
    for bad in (float("nan"), float("inf")):
        wl = w.clone().requires_grad_(True)
        images = g(wl) * torch.tensor(bad, dtype=torch.float64)
        with (
            pytest.warns(RuntimeWarning, match="non-finite path lengths")
            if bad != bad
            else (_no_warning())
        ):
            penalty = pl(images, wl, generator=torch.Generator().manual_seed(1))
        assert not torch.isfinite(penalty)
        assert torch.equal(pl.mean, mean_before)  # not updated from the bad batch
    wl = w.clone().requires_grad_(True)
    penalty = pl(g(wl), wl, generator=torch.Generator().manual_seed(3))
    want, _, mean = _hand(g, w, 3, mean_before.item(), 0.5, 2.0)
    assert torch.isfinite(penalty)
    torch.testing.assert_close(penalty, want, rtol=1e-6, atol=1e-9)
    assert pl.mean.item() == pytest.approx(mean.item(), rel=1e-6)
    # the functional form returns the previous mean for a non-finite batch
    wl = w.clone().requires_grad_(True)
    out = path_length_penalty(g(wl) * float("nan"), wl, mean=torch.tensor(0.25))
    assert out.mean.item() == 0.25


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per module: the second bad batch is quiet
            yield

    return cm()
