"""Curvature functions (to be split into operator + one module per estimator)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from gradlab._errors import GraphError
from gradlab.curvature._backprop import exact_diagonal

__all__ = [
    "Eigenpairs",
    "Spectrum",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "hessian_trace_by_block",
]

ParamsArg = torch.Tensor | Sequence[torch.Tensor] | nn.Module
GeneratorArg = torch.Generator | int | None
ProgressArg = bool | Callable[[int, int], object]
BlockArg = torch.Tensor | Sequence[torch.Tensor] | nn.Module
_MODES = ("eval", "train", None)


class Eigenpairs(NamedTuple):
    """Top-k eigenpairs by magnitude, largest first.

    ``values``: shape ``(k,)``. ``vectors``: shape ``(k, n)``, row ``i`` the unit eigenvector of
    ``values[i]`` flattened over ``params`` in order (``torch.cat([p.flatten() ...])``).
    """

    values: torch.Tensor
    vectors: torch.Tensor


class Spectrum(NamedTuple):
    """Spectral density estimate by stochastic Lanczos quadrature.

    ``grid`` and ``density`` (same length; ``torch.trapezoid(density, grid) == 1``), and the
    quadrature the density is smoothed from: ``nodes`` (Ritz values) and ``weights`` of shape
    ``(probes, steps)``, each probe's weights summing to 1.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor


# --------------------------------------------------------------------------------------------
# arguments


def _params(fn: str, params: ParamsArg) -> tuple[list[torch.Tensor], Any]:
    """The list of tensors, and how to give per-parameter results back (structure)."""
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{fn}: the module has no parameters with requires_grad; unfreeze some or pass "
                f"tensors"
            )
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(params, torch.Tensor):
        tensors, structure = [params], "tensor"
    elif isinstance(params, Sequence) and not isinstance(params, str):
        tensors, structure = list(params), "sequence"
        if not tensors:
            raise ValueError(f"{fn}: params is empty; pass at least one tensor")
    else:
        raise TypeError(
            f"{fn}: params is a {type(params).__name__}; pass a tensor, a sequence of tensors "
            f"or an nn.Module"
        )
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: params[{i}] is a {type(t).__name__}, expected a tensor")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: params[{i}] has dtype {t.dtype}; pass floating-point tensors")
        if not t.requires_grad:
            raise ValueError(
                f"{fn}: params[{i}] (shape {tuple(t.shape)}) does not require grad; call "
                f".requires_grad_() on it"
            )
    return tensors, structure


def _generator(fn: str, generator: GeneratorArg) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{fn}: generator is a {type(generator).__name__}; pass a torch.Generator, an int "
        f"seed or None"
    )


def _positive(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name}={value!r}; pass an int >= {minimum}")
    return value


def _method(fn: str, method: str, valid: Sequence[str]) -> None:
    if method not in valid:
        raise ValueError(
            f"{fn}: unknown method {method!r}; valid methods are "
            f"{', '.join(repr(m) for m in valid)}"
        )


@contextlib.contextmanager
def _model_state(fn: str, params: ParamsArg, mode: str | None) -> Iterator[None]:
    """With a module: set the mode, restore flags and buffers afterwards."""
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode={mode!r} is not one of {list(_MODES)}")
    if not isinstance(params, nn.Module) or (
        mode is None and not any(True for _ in params.buffers())
    ):
        yield
        return
    flags = [(m, m.training) for m in params.modules()]
    buffers = [(b, b.detach().clone()) for b in params.buffers()]
    try:
        if mode is not None:
            params.train(mode == "train")
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


class _Progress:
    """Progress of a run counted in Hessian-vector products (the unit that dominates the cost).

    ``progress=True``: one status line on stderr, rewritten in place with ``\\r`` at most ten
    times a second (plus the first and the last update), ended by a newline. A callable: called
    as ``progress(done, total)`` after every batch of products. When a method stops early
    (converged), the last update reports ``(done, done)``, so a bar ends full.
    """

    interval = 0.1  # seconds between two printed updates

    def __init__(self, fn: str, progress: ProgressArg):
        if not isinstance(progress, bool) and not callable(progress):
            raise TypeError(
                f"{fn}: progress is a {type(progress).__name__}; pass True (a status line on "
                f"stderr), False, or a callable progress(done, total)"
            )
        self.fn = fn
        self.callback = None if isinstance(progress, bool) else progress
        self.active = progress is True or self.callback is not None
        self.total = 0
        self.done = 0
        self.start = 0.0
        self.last = -math.inf
        self.width = 0

    @contextlib.contextmanager
    def run(self, total: int) -> Iterator[None]:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        if self.active and self.callback is None:
            self._print(final=False)
        try:
            yield
        except BaseException:
            if self.width:
                sys.stderr.write("\n")
                sys.stderr.flush()
            raise
        if self.active:
            if self.done < self.total:  # stopped early (converged): the bar ends full
                self.total = self.done
                if self.callback is not None:
                    self.callback(self.done, self.total)
            if self.callback is None:
                self._print(final=True)

    def advance(self, n: int) -> None:
        if not self.active:
            return
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
            self.last = self.done
        elif time.perf_counter() - self.last >= self.interval:
            self._print(final=False)

    def _print(self, *, final: bool) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        line = f"{self.fn}: {self.done}/{self.total} Hessian-vector products, {elapsed:.1f} s"
        if not final and self.done:
            line += f", ETA {elapsed / self.done * (self.total - self.done):.1f} s"
        sys.stderr.write("\r" + line.ljust(self.width) + ("\n" if final else ""))
        sys.stderr.flush()
        self.width = len(line)
        self.last = now


class _Hessian:
    """Hessian-vector products of one double-backward graph, on flat vectors."""

    def __init__(
        self,
        fn: str,
        loss_fn: Callable[[], torch.Tensor],
        params: list[torch.Tensor],
        count: Callable[[int], None] = lambda n: None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"{fn}: loss_fn is a {type(loss_fn).__name__}, expected a callable")
        self.fn = fn
        self.params = params
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.n = sum(self.sizes)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.batched: bool | None = None
        self.count = count  # progress, in Hessian-vector products
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"{fn}: loss_fn must return a scalar tensor, got {got}; reduce the loss "
                    f"(e.g. .mean())"
                )
            if not loss.requires_grad:
                raise GraphError(
                    f"{fn}: the loss does not depend on params (no grad_fn); check that loss_fn "
                    f"uses the parameters you passed, with grad enabled"
                )
            grads = torch.autograd.grad(
                loss.reshape(()), params, create_graph=True, allow_unused=True
            )
        self.loss = loss.detach()
        self.pairs = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.pairs]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """(n, ...) -> per-parameter pieces shaped (..., *param.shape) for the used params."""
        pieces = torch.split(v, self.sizes, dim=0)
        extra = v.shape[1:]
        out = []
        for i in self.pairs:
            piece = pieces[i].movedim(0, -1) if extra else pieces[i]
            out.append(piece.reshape(*extra, *self.shapes[i]).to(self.params[i].dtype))
        return out

    def _join(self, hv: Sequence[torch.Tensor | None], extra: tuple[int, ...]) -> torch.Tensor:
        full: list[torch.Tensor] = [
            torch.zeros(*extra, s, dtype=self.dtype, device=self.device) for s in self.sizes
        ]
        for i, h in zip(self.pairs, hv):
            if h is not None:
                full[i] = h.reshape(*extra, self.sizes[i]).to(self.dtype)
        return torch.cat(full, dim=-1)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length n (one product counted for progress)."""
        hv = self._mv(v)
        self.count(1)
        return hv

    def _mv(self, v: torch.Tensor) -> torch.Tensor:
        if not self.pairs:
            return torch.zeros_like(v)
        hv = torch.autograd.grad(
            self.grads,
            [self.params[i] for i in self.pairs],
            grad_outputs=self._split(v),
            retain_graph=True,
            allow_unused=True,
        )
        return self._join(hv, ())

    def _batched(self, block: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(
            self.grads,
            [self.params[i] for i in self.pairs],
            grad_outputs=self._split(block),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        return self._join(hv, (block.shape[1],)).T

    def _looped(self, block: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._mv(block[:, j]) for j in range(block.shape[1])], 1)

    def _choose_batching(self, V: torch.Tensor) -> None:
        """Batched double backward (vmap) is much faster for most ops, but some backward ops
        have no batching rule and fall back to a slow per-sample loop (log_softmax's, measured
        here ~15x slower than plain products). Time both on a few columns once and keep the
        faster."""
        probe = V[:, : min(8, V.shape[1])]
        try:
            self._batched(probe)  # warm-up
            t0 = time.perf_counter()
            self._batched(probe)
            t_batched = time.perf_counter() - t0
        except RuntimeError:  # an op that cannot be batched at all
            self.batched = False
            return
        t0 = time.perf_counter()
        self._looped(probe)
        self.batched = t_batched <= time.perf_counter() - t0

    def mm(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (n, m): batched double backward in chunks, or one at a time.

        Chunks hold about 2^20 vector entries (512 columns for small models, one column for
        models with a million parameters), bounding the extra memory of the batched backward.
        """
        if not self.pairs:
            self.count(V.shape[1])
            return torch.zeros_like(V)
        if self.batched is None:
            self._choose_batching(V)
        chunk = max(1, min(512, 2**20 // max(self.n, 1)))
        cols = []
        for start in range(0, V.shape[1], chunk):
            block = V[:, start : start + chunk]
            cols.append(self._batched(block) if self.batched else self._looped(block))
            self.count(block.shape[1])
        return torch.cat(cols, dim=1)

    def rademacher(
        self, m: int, generator: torch.Generator | None, rows: int | None = None
    ) -> torch.Tensor:
        dev = generator.device if generator is not None else self.device
        z = torch.randint(
            0, 2, (self.n if rows is None else rows, m), generator=generator, device=dev
        )
        return (2 * z - 1).to(dtype=self.dtype, device=self.device)

    def gaussian(self, m: int, generator: torch.Generator | None) -> torch.Tensor:
        dev = generator.device if generator is not None else self.device
        z = torch.randn((self.n, m), generator=generator, device=dev, dtype=self.dtype)
        return z.to(self.device)

    def structure(self, flat: torch.Tensor, structure: Any) -> Any:
        pieces = [p.reshape(s) for p, s in zip(torch.split(flat, self.sizes), self.shapes)]
        if structure == "tensor":
            return pieces[0]
        if structure == "sequence":
            return tuple(pieces)
        return dict(zip(structure, pieces))


def _exact_diagonal(H: _Hessian, chunk: int = 64) -> torch.Tensor:
    diag = []
    for start in range(0, H.n, chunk):
        stop = min(H.n, start + chunk)
        E = torch.zeros(H.n, stop - start, dtype=H.dtype, device=H.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        diag.append(H.mm(E)[torch.arange(start, stop), torch.arange(stop - start)])
    return torch.cat(diag)


# --------------------------------------------------------------------------------------------
# trace and diagonal


def hessian_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: ParamsArg,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    progress: ProgressArg = False,
) -> torch.Tensor:
    r"""Trace of the Hessian of the loss w.r.t. ``params``.

    ``"hutchinson"``: :math:`\operatorname{tr} H \approx \frac1m \sum_i z_i^\top H z_i` with
    Rademacher probes :math:`z_i` (unbiased; standard error
    :math:`\sqrt{2\|H\|_F^2 - 2\sum_i H_{ii}^2}/\sqrt m`).
    ``"hutch++"``: Hutch++ with ``samples`` Hessian-vector products in all: a third sketch
    :math:`Q = \operatorname{orth}(H S)`, the exact trace of :math:`Q^\top H Q`, and Hutchinson on
    the deflated rest (far lower variance when a few eigenvalues dominate).
    ``"exact"``: :math:`\sum_i e_i^\top H e_i` (n products; small models).

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        samples: number of probes (``"hutch++"``: total products, at least 3).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: with a module, ``"eval"``, ``"train"`` or ``None`` (see the module docs).
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``
            (see the module docs); counts Hessian-vector products (``samples``, or n for
            ``"exact"``).

    Returns:
        A 0-dim tensor in the parameters' dtype.

    Raises:
        ValueError: unknown method, bad ``samples``, non-scalar loss, params without grad.
        GraphError: the loss does not depend on ``params``.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gl.hessian_trace(lambda: (w**4).sum(), w, method="exact")  # 12 w^2
        tensor(60.)
    """
    fn = "hessian_trace"
    _method(fn, method, ("hutchinson", "hutch++", "exact"))
    _positive(fn, "samples", samples, 3 if method == "hutch++" else 1)
    tensors, _ = _params(fn, params)
    gen = _generator(fn, generator)
    prog = _Progress(fn, progress)
    with _model_state(fn, params, mode):
        H = _Hessian(fn, loss_fn, tensors, count=prog.advance)
        with prog.run(H.n if method == "exact" else samples):
            return _trace(H, method, samples, gen)


def _trace(H: _Hessian, method: str, samples: int, gen: torch.Generator | None) -> torch.Tensor:
    if method == "exact":
        return _exact_diagonal(H).sum()
    if method == "hutchinson":
        Z = H.rademacher(samples, gen)
        return (Z * H.mm(Z)).sum() / samples
    k = samples // 3
    rest = samples - 2 * k
    S = H.rademacher(k, gen)
    Q, _ = torch.linalg.qr(H.mm(S))
    G = H.rademacher(rest, gen)
    G = G - Q @ (Q.T @ G)
    return (Q * H.mm(Q)).sum() + (G * H.mm(G)).sum() / rest


def hessian_diagonal(
    loss_fn: Callable[[], torch.Tensor],
    params: ParamsArg,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    progress: ProgressArg = False,
) -> Any:
    r"""Diagonal of the Hessian of the loss w.r.t. ``params``.

    ``"hutchinson"``: :math:`\operatorname{diag} H \approx \frac1m \sum_i z_i \odot H z_i` with
    Rademacher probes (Bekas et al. 2007; unbiased, the error of entry j falls as
    :math:`\sqrt{\sum_{k\ne j} H_{jk}^2 / m}`). ``"exact"``: by Hessian backpropagation
    (one forward pass and a backward pass of per-sample curvature; no products, ``progress`` is
    not called) when the parameters sit in a chain of ``nn.Linear``/``nn.Conv2d`` layers and
    element-wise activation modules followed by a loss separable over samples (see
    ``gradlab.curvature._backprop`` for the modules that take this fast path); otherwise
    :math:`H_{jj} = e_j^\top H e_j` (n products, and ``loss_fn`` is called once more).

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        samples: number of probes for ``"hutchinson"``.
        method: ``"hutchinson"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts Hessian-vector products (``samples``, or n for ``"exact"``).

    Returns:
        Structured like ``params``: a tensor for a tensor, a tuple for a sequence, a dict
        ``{name: diagonal}`` for a module; each entry has its parameter's shape.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gl.hessian_diagonal(lambda: (w**4).sum(), w, method="exact")
        tensor([12., 48.])
    """
    fn = "hessian_diagonal"
    _method(fn, method, ("hutchinson", "exact"))
    _positive(fn, "samples", samples)
    tensors, structure = _params(fn, params)
    gen = _generator(fn, generator)
    prog = _Progress(fn, progress)
    with _model_state(fn, params, mode):
        if method == "exact" and callable(loss_fn):  # Hessian backpropagation, if supported
            fast = exact_diagonal(loss_fn, tensors)
            if fast is not None:  # no Hessian-vector products: progress is not called
                if structure == "tensor":
                    return fast[0]
                return tuple(fast) if structure == "sequence" else dict(zip(structure, fast))
        H = _Hessian(fn, loss_fn, tensors, count=prog.advance)
        with prog.run(H.n if method == "exact" else samples):
            if method == "exact":
                diag = _exact_diagonal(H)
            else:
                Z = H.rademacher(samples, gen)
                diag = (Z * H.mm(Z)).mean(dim=1)
    return H.structure(diag, structure)


def _blocks(
    fn: str, blocks: Mapping[str, BlockArg] | nn.Module
) -> tuple[list[str], list[list[torch.Tensor]], list[nn.Module]]:
    """Block names, each block's tensors, and the modules among the blocks (for ``mode``)."""
    if isinstance(blocks, nn.Module):
        named = [(n, p) for n, p in blocks.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{fn}: the module has no parameters with requires_grad; unfreeze some or pass "
                f"a dict of blocks"
            )
        return [n for n, _ in named], [[p] for _, p in named], [blocks]
    if not isinstance(blocks, Mapping):
        raise TypeError(
            f"{fn}: blocks is a {type(blocks).__name__}; pass a dict name -> tensor, sequence of "
            f"tensors or module (e.g. dict(model.named_children())), or a module (one block per "
            f"parameter)"
        )
    if not blocks:
        raise ValueError(f"{fn}: blocks is an empty dict; pass at least one block")
    names, groups, modules = [], [], []
    for name, block in blocks.items():
        if not isinstance(name, str):
            raise TypeError(f"{fn}: blocks has a key {name!r}; block names must be strings")
        if isinstance(block, nn.Module) and not any(p.requires_grad for p in block.parameters()):
            # e.g. an activation among named_children(): an empty block, trace 0
            tensors: list[torch.Tensor] = []
        else:
            tensors, _ = _params(f"{fn}: block {name!r}", block)
        names.append(name)
        groups.append(tensors)
        if isinstance(block, nn.Module):
            modules.append(block)
    if not any(groups):
        raise ValueError(
            f"{fn}: no block has parameters with requires_grad; pass blocks that hold trainable "
            f"parameters"
        )
    return names, groups, modules


def hessian_trace_by_block(
    loss_fn: Callable[[], torch.Tensor],
    blocks: Mapping[str, BlockArg] | nn.Module,
    *,
    samples: int = 100,
    method: str = "hutchinson",
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    progress: ProgressArg = False,
) -> dict[str, torch.Tensor]:
    r"""Trace of each diagonal block of the Hessian: :math:`\operatorname{tr} H_{bb}` per block.

    Layer-wise curvature (PyHessian's per-layer trace): for a block :math:`b` of parameters,
    :math:`H_{bb}` is the Hessian of the loss w.r.t. that block alone (the others held fixed).
    One forward/backward builds the gradient of all the blocks' parameters; then
    ``"hutchinson"`` estimates each :math:`\operatorname{tr} H_{bb} \approx \frac1m \sum_i
    z_i^\top H_{bb} z_i` with ``samples`` Rademacher probes restricted to the block (zero
    elsewhere), so the off-block couplings :math:`H_{bc}` add no variance (cost:
    ``samples * len(blocks)`` Hessian-vector products). ``"exact"``: the sum of the exact
    Hessian diagonal over each block (n products in all). When the blocks partition the
    parameters, the block traces sum to :math:`\operatorname{tr} H`. A parameter may appear in
    several blocks; each block's trace then counts it. A module block without trainable
    parameters (an activation among ``named_children()``) is an empty block: trace 0.

    The per-block diagonal is :func:`hessian_diagonal` (its entries do not depend on the
    blocking): with a module it already returns ``{name: diagonal}`` per parameter.

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        blocks: a dict ``name -> block``, each block a tensor, a sequence of tensors or a module
            (its trainable parameters), e.g. ``dict(model.named_children())`` for one block per
            layer; or a module, for one block per trainable parameter (keys: parameter names).
        samples: number of probes per block for ``"hutchinson"``.
        method: ``"hutchinson"`` or ``"exact"``.
        generator: a ``torch.Generator`` or an int seed for the probes.
        mode: ``"eval"``, ``"train"`` or ``None``, applied to the modules among the blocks (or to
            ``blocks`` itself if it is a module), restored afterwards; with tensor blocks, set
            the model's mode yourself.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts Hessian-vector products (``samples * len(blocks)``, or n for ``"exact"``).

    Returns:
        A dict with the keys of ``blocks`` (in order), each a 0-dim tensor in the parameters'
        dtype.

    Raises:
        TypeError: ``blocks`` is not a dict or a module, a block is not a tensor, sequence or
            module, or ``progress`` is not a bool or a callable.
        ValueError: empty ``blocks``, unknown method, bad ``samples``, non-scalar loss, params
            without grad.
        GraphError: the loss does not depend on the parameters.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.tensor([3.0], requires_grad=True)
        >>> loss_fn = lambda: (w**4).sum() + (b * w.sum()) ** 2
        >>> gl.hessian_trace_by_block(loss_fn, {"w": w, "b": b}, method="exact")
        {'w': tensor(96.), 'b': tensor(18.)}
    """
    fn = "hessian_trace_by_block"
    _method(fn, method, ("hutchinson", "exact"))
    _positive(fn, "samples", samples)
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode={mode!r} is not one of {list(_MODES)}")
    names, groups, modules = _blocks(fn, blocks)
    gen = _generator(fn, generator)
    prog = _Progress(fn, progress)
    union: list[torch.Tensor] = []
    position: dict[int, int] = {}
    for group in groups:
        for t in group:
            if id(t) not in position:
                position[id(t)] = len(union)
                union.append(t)
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_model_state(fn, module, mode))
        H = _Hessian(fn, loss_fn, union, count=prog.advance)
        offsets = [0]
        for size in H.sizes:
            offsets.append(offsets[-1] + size)
        index = [
            torch.cat(
                [torch.zeros(0, dtype=torch.long)]
                + [
                    torch.arange(offsets[position[id(t)]], offsets[position[id(t)] + 1])
                    for t in group
                ]
            ).to(H.device)
            for group in groups
        ]
        nonempty = sum(1 for idx in index if len(idx))
        traces = []
        with prog.run(H.n if method == "exact" else samples * nonempty):
            if method == "exact":
                diag = _exact_diagonal(H)
                traces = [diag[idx].sum() for idx in index]
            else:
                for idx in index:
                    if not len(idx):
                        traces.append(torch.zeros((), dtype=H.dtype, device=H.device))
                        continue
                    Z = torch.zeros(H.n, samples, dtype=H.dtype, device=H.device)
                    Z[idx] = H.rademacher(samples, gen, rows=len(idx))
                    traces.append((Z[idx] * H.mm(Z)[idx]).sum() / samples)
    return dict(zip(names, traces))


# --------------------------------------------------------------------------------------------
# eigenvalues and spectrum


def _lanczos(
    H: _Hessian, v0: torch.Tensor, steps: int, k: int | None = None, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanczos with full reorthogonalisation; returns (alpha, beta, V) with V of shape (n, m).

    With ``k``, stops early once the top-k Ritz values (by magnitude) have residual bounds below
    ``tol`` times their size.
    """
    V = torch.zeros(H.n, steps, dtype=H.dtype, device=H.device)
    alpha: list[float] = []
    beta: list[float] = []
    v = v0 / v0.norm()
    for j in range(steps):
        V[:, j] = v
        w = H.mv(v)
        a = float(w @ v)
        alpha.append(a)
        basis = V[:, : j + 1]
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - basis @ (basis.T @ w)
        b = float(w.norm())
        if j == steps - 1 or b <= 1e-10 * max(1.0, abs(a)):
            break
        if k is not None and j + 1 >= k and (j + 1) % 5 == 0:
            T = _tridiag(alpha, beta)
            theta, S = torch.linalg.eigh(T)
            top = torch.argsort(theta.abs(), descending=True)[:k]
            resid = b * S[-1, top].abs()
            if bool((resid <= tol * theta[top].abs().clamp_min(1e-30)).all()):
                break
        beta.append(b)
        v = w / b
    m = len(alpha)
    return (
        torch.tensor(alpha, dtype=torch.float64),
        torch.tensor(beta[: m - 1], dtype=torch.float64),
        V[:, :m],
    )


def _tridiag(alpha: Sequence[float] | torch.Tensor, beta: Sequence[float] | torch.Tensor):  # type: ignore[no-untyped-def]
    a = torch.as_tensor(alpha, dtype=torch.float64)
    b = torch.as_tensor(beta, dtype=torch.float64)[: len(a) - 1]
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def hessian_eigenvalues(
    loss_fn: Callable[[], torch.Tensor],
    params: ParamsArg,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    progress: ProgressArg = False,
) -> Eigenpairs:
    r"""Top-k eigenvalues of the Hessian by magnitude, largest first, and their eigenvectors.

    ``"lanczos"``: Lanczos with full reorthogonalisation from one random start, at most
    ``max_iter`` Hessian-vector products (capped at n, where it is exact), stopping when the top-k
    Ritz pairs have residual :math:`\|H x - \theta x\| \le` ``tol`` :math:`|\theta|`.
    ``"power"``: power iteration with deflation (PyHessian's method), one eigenpair after the
    other, each for at most ``max_iter`` products or until the Rayleigh quotient changes by less
    than ``tol`` relatively (slow when eigenvalues are close in magnitude).

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        k: how many eigenvalues.
        method: ``"lanczos"`` or ``"power"``.
        max_iter: Hessian-vector products at most (per eigenpair for ``"power"``).
        tol: relative tolerance (see above).
        generator: a ``torch.Generator`` or an int seed for the start vectors.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts Hessian-vector products (= Lanczos steps; total ``min(max_iter, n)``, or
            ``k * max_iter`` for ``"power"``; an early stop ends with ``(done, done)``).

    Returns:
        :class:`Eigenpairs` ``(values, vectors)``: ``values`` of shape ``(k,)`` sorted by
        decreasing magnitude, ``vectors`` of shape ``(k, n)``.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> gl.hessian_eigenvalues(lambda: (w**4).sum(), w, k=2).values.round()  # 12 w^2
        tensor([48., 12.])
    """
    fn = "hessian_eigenvalues"
    _method(fn, method, ("lanczos", "power"))
    _positive(fn, "k", k)
    _positive(fn, "max_iter", max_iter)
    tensors, _ = _params(fn, params)
    gen = _generator(fn, generator)
    prog = _Progress(fn, progress)
    with _model_state(fn, params, mode):
        H = _Hessian(fn, loss_fn, tensors, count=prog.advance)
        if k > H.n:
            raise ValueError(f"{fn}: k={k} but the Hessian is only {H.n}x{H.n}; pass k <= {H.n}")
        total = min(H.n, max(max_iter, k)) if method == "lanczos" else k * max_iter
        with prog.run(total):
            return _top_eigenpairs(fn, H, method, k, max_iter, tol, gen)


def _top_eigenpairs(
    fn: str,
    H: _Hessian,
    method: str,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator | None,
) -> Eigenpairs:
    if method == "lanczos":
        steps = min(H.n, max(max_iter, k))
        alpha, beta, V = _lanczos(H, H.gaussian(1, gen)[:, 0], steps, k=k, tol=tol)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        top = torch.argsort(theta.abs(), descending=True)[:k]
        if len(top) < k:
            raise GraphError(
                f"{fn}: Lanczos found an invariant subspace of dimension {len(top)} < k={k} "
                f"(the start vector missed part of the spectrum); try another generator"
            )
        vectors = (V @ S[:, top].to(H.dtype)).T
        return Eigenpairs(theta[top].to(H.dtype), vectors)
    values: list[torch.Tensor] = []
    found: list[torch.Tensor] = []
    for _ in range(k):
        v = H.gaussian(1, gen)[:, 0]
        lam = torch.tensor(0.0, dtype=H.dtype, device=H.device)
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = H.mv(v)
            for u in found:
                hv = hv - (u @ hv) * u
            new = v @ hv
            v = hv
            converged = (new - lam).abs() <= tol * new.abs()
            lam = new
            if bool(converged):
                break
        for u in found:
            v = v - (u @ v) * u
        v = v / v.norm()
        values.append(lam)
        found.append(v)
    vals = torch.stack(values)
    order = torch.argsort(vals.abs(), descending=True)
    return Eigenpairs(vals[order], torch.stack(found)[order])


def _slq_nodes(H: _Hessian, V0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos on all probes at once (block of columns); Gauss quadrature nodes and weights."""
    P = V0.shape[1]
    Q = torch.zeros(P, m, H.n, dtype=H.dtype, device=H.device)
    alpha = torch.zeros(P, m, dtype=torch.float64)
    beta = torch.zeros(P, m, dtype=torch.float64)
    v = (V0 / V0.norm(dim=0, keepdim=True)).T  # (P, n)
    alive = torch.ones(P, dtype=torch.bool, device=H.device)
    for j in range(m):
        Q[:, j] = v
        w = H.mm(v.T).T  # (P, n)
        a = (w * v).sum(1)
        alpha[:, j] = a.double().cpu()
        basis = Q[:, : j + 1]  # (P, j+1, n)
        for _ in range(2):
            w = w - torch.einsum("pk,pkn->pn", torch.einsum("pkn,pn->pk", basis, w), basis)
        b = w.norm(dim=1)
        if j == m - 1:
            break
        # a probe whose Krylov space is exhausted stops: zero coupling, zero further vectors
        alive = alive & (b > 1e-10 * a.abs().clamp_min(1.0))
        b = torch.where(alive, b, torch.zeros_like(b))
        beta[:, j] = b.double().cpu()
        v = torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w))
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1)
    T = T + torch.diag_embed(beta[:, : m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[:, 0, :] ** 2


def hessian_spectrum(
    loss_fn: Callable[[], torch.Tensor],
    params: ParamsArg,
    *,
    probes: int = 10,
    steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: GeneratorArg = None,
    mode: str | None = "eval",
    progress: ProgressArg = False,
) -> Spectrum:
    r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

    For each of ``probes`` random unit vectors :math:`v` (Rademacher, scaled), ``steps`` Lanczos
    steps give a Gauss quadrature :math:`v^\top f(H) v \approx \sum_i w_i f(\theta_i)` with nodes
    :math:`\theta_i` (Ritz values) and weights :math:`w_i` (squared first components of the
    eigenvectors of the tridiagonal matrix; they sum to 1). The density is the average over probes
    of :math:`\sum_i w_i\, \mathcal N(t; \theta_i, \sigma^2)` on a grid spanning the nodes
    :math:`\pm 6\sigma`, renormalised so its trapezoidal integral is exactly 1. Its mean
    :math:`\int t\,\rho(t)\,dt` estimates :math:`\operatorname{tr}(H)/n` (the quadrature is exact
    for :math:`f(t) = t`: each probe contributes :math:`v^\top H v`).

    Args:
        loss_fn: zero-argument callable returning a scalar loss.
        params: a tensor, a sequence of tensors, or a module (its trainable parameters).
        probes: number of random start vectors.
        steps: Lanczos steps per probe (capped at n).
        grid_size: number of grid points.
        sigma: Gaussian smoothing width (default: 1% of the node range, or 1e-3 if that is 0).
        generator: a ``torch.Generator`` or an int seed.
        mode: with a module, ``"eval"``, ``"train"`` or ``None``.
        progress: ``True`` for a status line on stderr, or a callable ``progress(done, total)``;
            counts Hessian-vector products (``probes * steps``).

    Returns:
        :class:`Spectrum` ``(grid, density, nodes, weights)``.

    Example:
        >>> import gradlab as gl
        >>> w = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
        >>> s = gl.hessian_spectrum(lambda: (w**4).sum(), w, probes=4, generator=0)
        >>> round(torch.trapezoid(s.density, s.grid).item(), 4)
        1.0
    """
    fn = "hessian_spectrum"
    _positive(fn, "probes", probes)
    _positive(fn, "steps", steps)
    _positive(fn, "grid_size", grid_size, 2)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"{fn}: sigma={sigma!r}; pass a positive width or None")
    tensors, _ = _params(fn, params)
    gen = _generator(fn, generator)
    prog = _Progress(fn, progress)
    with _model_state(fn, params, mode):
        H = _Hessian(fn, loss_fn, tensors, count=prog.advance)
        m = min(steps, H.n)
        with prog.run(probes * m):
            nodes, weights = _slq_nodes(H, H.rademacher(probes, gen), m)
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = sigma if sigma is not None else (0.01 * (hi - lo) or 1e-3)
    grid = torch.linspace(lo - 6 * width, hi + 6 * width, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / width) ** 2)
    density = (kernel * weights.reshape(1, -1)).sum(1) / (probes * width * math.sqrt(2 * math.pi))
    density = density / torch.trapezoid(density, grid)
    return Spectrum(grid.to(H.dtype), density.to(H.dtype), nodes.to(H.dtype), weights.to(H.dtype))
