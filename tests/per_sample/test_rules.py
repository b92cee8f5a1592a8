"""Each closed-form path against the per-sample gradients formed explicitly: both branches of the
sequence ghost norm (``2T^2 < I O`` and not), Embedding's ghost norm, every registered layer type
listed in the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.per_sample import RULES, PerSampleGradients
from gradlab.per_sample._conv import unfold
from gradlab.per_sample._linear import seq_dot, seq_grad, seq_norm_sq
from tests.per_sample._reference import dot_mean_of, dot_of, reference_grads, stats_of

TOL64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize(
    ("t", "i", "o"),
    [(1, 5, 4), (3, 6, 5), (9, 3, 4)],
    ids=["one_position", "ghost_2T2_lt_IO", "materialised_2T2_ge_IO"],
)
def test_sequence_ghost_norm_both_branches(t: int, i: int, o: int) -> None:
    a = torch.randn(4, 2, t, i, dtype=torch.float64)
    d = torch.randn(4, 2, t, o, dtype=torch.float64)
    g = torch.einsum("bgto,bgti->bgoi", d, a)  # sum_t d_t a_t^T, written out
    torch.testing.assert_close(seq_grad(a, d), g, **TOL64)
    torch.testing.assert_close(seq_norm_sq(a, d), g.square().sum((1, 2, 3)), **TOL64)
    v = torch.randn(2, o, i, dtype=torch.float64)
    torch.testing.assert_close(seq_dot(a, d, v), (g * v).sum((1, 2, 3)), **TOL64)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unfold_matches_the_convolution(dims: int) -> None:
    """conv(x, W) == W_flat @ unfold(x) for strided, dilated, padded N-d convolutions."""
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](
        2, 3, 3, stride=2, padding=1, dilation=2, padding_mode="circular"
    ).double()
    x = torch.randn(2, 2, *([9] * dims), dtype=torch.float64)
    cols = unfold(
        x,
        conv.kernel_size,
        conv.stride,
        conv.dilation,
        list(conv._reversed_padding_repeated_twice),
        "circular",
    )
    y = conv.weight.flatten(1) @ cols + conv.bias[:, None]
    torch.testing.assert_close(y, conv(x).flatten(2), **TOL64)


class _Ids(nn.Module):
    """A model of one registered layer on its own (so that its own path is what runs)."""

    def __init__(self, layer: nn.Module, make_input) -> None:
        super().__init__()
        self.layer = layer
        self.make_input = make_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).flatten(1)


LAYERS = {
    nn.Linear: (lambda: nn.Linear(4, 3), lambda b: torch.randn(b, 2, 4)),
    nn.Conv1d: (lambda: nn.Conv1d(4, 4, 3, groups=2, padding=2), lambda b: torch.randn(b, 4, 6)),
    nn.Conv2d: (lambda: nn.Conv2d(2, 4, 2, stride=2), lambda b: torch.randn(b, 2, 5, 5)),
    nn.Conv3d: (lambda: nn.Conv3d(2, 2, 2, dilation=2), lambda b: torch.randn(b, 2, 4, 4, 4)),
    nn.ConvTranspose1d: (
        lambda: nn.ConvTranspose1d(2, 4, 3, stride=3, groups=2),
        lambda b: torch.randn(b, 2, 4),
    ),
    nn.ConvTranspose2d: (
        lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, padding=1, output_padding=1),
        lambda b: torch.randn(b, 2, 3, 3),
    ),
    nn.ConvTranspose3d: (
        lambda: nn.ConvTranspose3d(2, 2, 2, dilation=2),
        lambda b: torch.randn(b, 2, 2, 2, 2),
    ),
    nn.Embedding: (
        lambda: nn.Embedding(50, 3, padding_idx=1),
        lambda b: torch.randint(0, 50, (b, 4)),
    ),
    nn.LayerNorm: (lambda: nn.LayerNorm((3, 4)), lambda b: torch.randn(b, 2, 3, 4)),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 4), lambda b: torch.randn(b, 4, 3)),
}
if hasattr(nn, "RMSNorm"):
    LAYERS[nn.RMSNorm] = (lambda: nn.RMSNorm(4), lambda b: torch.randn(b, 3, 4))


def test_every_registered_layer_is_tested_here() -> None:
    assert set(RULES) == set(LAYERS)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


@pytest.mark.parametrize(
    "stats",
    [("norm", "dot"), ("grad", "sum_sq", "variance", "dot"), ("norm", "dot_mean", "dot")],
    ids=["ghost", "formed", "dot_mean"],
)
@pytest.mark.parametrize("cls", list(LAYERS), ids=lambda c: c.__name__)
def test_each_layer_alone(cls, stats) -> None:
    make, data = LAYERS[cls]
    layer = make().double()
    x = data(5)
    x = x.double() if x.is_floating_point() else x
    if cls is nn.Embedding:
        x[0, 0] = 1  # the padding index gets no gradient
        x[1, :2] = 7  # an index used twice in one sample
    model = _Ids(layer, data)
    y = torch.randn_like(model(x))
    ref = reference_grads(model, _mse, x, y)
    with PerSampleGradients(model, stats=stats) as ps:
        _mse(model(x), y).backward()
    want = stats_of(ref)
    torch.testing.assert_close(ps.norm, want["norm"], **TOL64)
    for stat in ("grad", "sum_sq", "variance"):
        if stat in stats:
            torch.testing.assert_close(getattr(ps, stat), want[stat], **TOL64)
    v = {n: torch.randn_like(g[0]) for n, g in ref.items()}
    torch.testing.assert_close(ps.dot(v), dot_of(ref, v), **TOL64)
    if "dot_mean" in stats:
        torch.testing.assert_close(ps.dot_mean_by_param, dot_mean_of(ref), **TOL64)


def test_embedding_ghost_norm_for_large_vocabularies() -> None:
    emb = nn.Embedding(1000, 4).double()  # T^2 = 9 < 1000: the ghost path
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2)).double()
    x, y = torch.randint(0, 1000, (6, 3)), torch.randint(0, 2, (6,))
    x[2] = 5  # one index three times
    ref = reference_grads(model, F.cross_entropy, x, y)
    with PerSampleGradients(model) as ps:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(ps.norm_by_param, stats_of(ref)["norm_by_param"], **TOL64)


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: not the Linear rule's maths, so the fallback."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x).tanh()


class Scale(nn.Module):
    """A custom layer ``y = x * w`` (per feature)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_subclass_with_its_own_forward_goes_through_the_fallback() -> None:
    from gradlab.per_sample._registry import rule_for

    layer = ScaledLinear(4, 3)
    assert rule_for(layer) is None and rule_for(nn.Linear(2, 2)) is RULES[nn.Linear]
    model = nn.Sequential(layer, nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    ref = reference_grads(model, F.cross_entropy, x, y)
    with PerSampleGradients(model, stats=("grad",)) as ps:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(ps.grad, ref, **TOL64)


def test_registering_a_rule_for_a_custom_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradlab.per_sample import Rule, register

    calls: list[int] = []

    def grad(module, a, d, names):  # g_i = sum over positions of d * x
        calls.append(1)
        return {"w": (d * a).reshape(a.shape[0], -1, a.shape[-1]).sum(1)}

    monkeypatch.setitem(RULES, Scale, RULES.get(Scale))  # restored after the test
    register(Scale, Rule(grad=grad))
    model = nn.Sequential(Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 2, (5, 3))
    loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, 2), t.reshape(-1))
    ref = reference_grads(model, loss_fn, x, y)
    with PerSampleGradients(model, stats=("grad",)) as ps:
        loss_fn(model(x), y).backward()
    assert calls  # the registered rule ran, not the fallback
    torch.testing.assert_close(ps.grad, ref, **TOL64)


CONVS = {
    "conv1d_strided_dilated_grouped": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (4, 11),
    ),
    "conv2d_same_even_kernel_reflect": (
        lambda: nn.Conv2d(4, 4, (4, 3), padding="same", padding_mode="reflect"),
        (4, 7, 6),
    ),
    "conv2d_circular_grouped": (
        lambda: nn.Conv2d(2, 6, 3, padding=1, padding_mode="circular", groups=2),
        (2, 5, 5),
    ),
    "conv2d_replicate_strided": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2), padding_mode="replicate"),
        (3, 6, 7),
    ),
    "conv2d_wide_few_positions": (lambda: nn.Conv2d(3, 64, 3), (3, 4, 4)),
    "conv2d_1x1_strided_padded": (lambda: nn.Conv2d(4, 6, 1, stride=2, padding=1), (4, 5, 6)),
    "conv3d_same_dilated_grouped_circular": (
        lambda: nn.Conv3d(
            4, 4, 3, padding="same", dilation=(1, 2, 1), groups=2, padding_mode="circular"
        ),
        (4, 3, 5, 4),
    ),
    "conv3d_mixed": (
        lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
        (2, 5, 4, 4),
    ),
    "convT1d_grouped_output_padding": (
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2
        ),
        (4, 5),
    ),
    "convT2d_strided": (
        lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
        (2, 3, 3),
    ),
    "convT2d_wide": (lambda: nn.ConvTranspose2d(16, 32, 2), (16, 2, 2)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 2, 2, 3)),
    # output_padding >= stride (allowed below the dilation): the adjoint convolution has more
    # positions than the layer's input
    "convT1d_output_padding_beyond_stride": (
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=3, output_padding=2),
        (2, 5),
    ),
    "convT2d_grouped_output_padding_beyond_stride": (
        lambda: nn.ConvTranspose2d(
            4, 6, 3, stride=(2, 1), padding=1, dilation=(1, 3), output_padding=(1, 2), groups=2
        ),
        (4, 4, 5),
    ),
}


@pytest.mark.parametrize(
    "stats",
    [("norm",), ("norm", "dot_mean", "dot"), ("norm", "sum_sq", "variance", "dot_mean", "dot")],
    ids=["norm", "dots", "economy"],
)
@pytest.mark.parametrize("case", list(CONVS))
def test_convolutions_every_path(case: str, stats) -> None:
    """Ghost or formed norms, the dot through a convolution with V, the dot with the batch
    mean (formed, or the mean first by a weight-gradient convolution), second moments."""
    make, shape = CONVS[case]
    model = _Ids(make().double(), None)
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randn_like(model(x))
    ref = reference_grads(model, _mse, x, y)
    with PerSampleGradients(model, stats=stats) as ps:
        _mse(model(x), y).backward()
    want = stats_of(ref)
    torch.testing.assert_close(ps.norm_by_param, want["norm_by_param"], **TOL64)
    if "sum_sq" in stats:
        torch.testing.assert_close(ps.sum_sq, want["sum_sq"], **TOL64)
        torch.testing.assert_close(ps.variance, want["variance"], **TOL64)
    if "dot" in stats:
        v = {n: torch.randn_like(g[0]) for n, g in ref.items()}
        torch.testing.assert_close(ps.dot(v), dot_of(ref, v), **TOL64)
        torch.testing.assert_close(ps.dot_mean_by_param, dot_mean_of(ref), **TOL64)
    ps.close()


# (unfolded patches or grouped convolutions, CHUNK_BYTES); None: the patches of 3 samples, so
# that a batch of 7 is unfolded in chunks of 3, 3 and 1
_WAYS = {
    "grouped_one_sample_per_call": (False, 1),
    "grouped_uneven_chunks": (False, 700),
    "grouped_whole_batch": (False, 1 << 40),
    "unfold_one_sample_per_chunk": (True, 1),
    "unfold_uneven_chunks": (True, None),
    "unfold_whole_batch": (True, 1 << 40),
}


def _patch_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """The bytes of one sample's unfolded patches (of the layer seen as a convolution)."""
    from gradlab.per_sample import _conv

    with torch.no_grad():
        cols, _ = _conv._patches(layer, x[:1], layer(x[:1]))
    return cols.numel() * cols.element_size()


@pytest.mark.parametrize(
    ("case", "way"),
    [(case, way) for case in CONVS for way in _WAYS],
)
def test_convolution_grads_every_way_of_forming_them(
    case: str, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-sample weight gradients of a convolution or a transposed one (the adjoint
    convolution), from unfolded patches or by grouped weight-gradient convolutions, of chunks of
    samples or of the whole batch, whichever the layer's size would pick, are those of the
    reference."""
    from gradlab.per_sample import _conv

    make, shape = CONVS[case]
    unfold, chunk_bytes = _WAYS[way]
    model = _Ids(make().double(), None)
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randn_like(model(x))
    ref = reference_grads(model, _mse, x, y)
    if chunk_bytes is None:
        chunk_bytes = 3 * _patch_bytes(model.layer, x)
    monkeypatch.setattr(_conv, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(_conv, "_unfold_cheaper", lambda module, out: unfold)
    with PerSampleGradients(model, stats=("grad",)) as ps:
        _mse(model(x), y).backward()
    torch.testing.assert_close(ps.grad, ref, **TOL64)


@pytest.mark.parametrize(
    ("make", "shape", "unfolded"),
    [
        (lambda: nn.Conv2d(16, 16, 1), (16, 32, 32), True),  # 1x1: the patches are the input
        (lambda: nn.Conv1d(8, 8, 1, stride=2), (8, 64), True),  # a strided view of it
        (lambda: nn.Conv2d(8, 32, 3, padding=1), (8, 8, 8), True),  # L = 64 = 2 O
        (lambda: nn.Conv2d(8, 32, 3, padding=1), (8, 9, 9), False),  # L = 81 > 2 O
        (lambda: nn.Conv2d(8, 32, 3, padding=1, groups=4), (8, 4, 4), True),  # L = 16 = 2 O/G
        (lambda: nn.Conv2d(8, 32, 3, padding=1, groups=4), (8, 5, 5), False),
        (lambda: nn.ConvTranspose2d(32, 8, 3, stride=2), (32, 8, 8), True),  # L = 64 = 2 x 32
        (lambda: nn.ConvTranspose2d(32, 8, 3, stride=2), (32, 9, 9), False),
    ],
)
def test_default_way_of_forming_convolution_grads(make, shape, unfolded: bool) -> None:
    """The default picks unfolded patches for kernels of one element and where there are at
    most twice as many output positions ``L`` as output channels per group ``O`` of the layer
    seen as a convolution (a transposed convolution's input positions and channels), grouped
    weight-gradient convolutions beyond; either way the gradients are the reference's."""
    from gradlab.per_sample import _conv

    model = _Ids(make().double(), None)
    x = torch.randn(3, *shape, dtype=torch.float64)
    y = torch.randn_like(model(x))
    picked = []
    choose = _conv._unfold_cheaper

    def spy(module: nn.Module, out: torch.Tensor) -> bool:
        picked.append(choose(module, out))
        return picked[-1]

    ref = reference_grads(model, _mse, x, y)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_conv, "_unfold_cheaper", spy)
        with PerSampleGradients(model, stats=("grad",)) as ps:
            _mse(model(x), y).backward()
    assert picked == [unfolded]
    torch.testing.assert_close(ps.grad, ref, **TOL64)
