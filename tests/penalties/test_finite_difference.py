"""R1/R2 with method="finite-difference": the formula written out, unbiasedness against exact R1
(float64, many draws, within 4 standard errors), the O(sigma^2) bias where it is known exactly,
torch.compile, errors.

Many draws come cheaply from one call: every sample of a batch gets its own epsilon, so a batch of
N copies of one point is N independent draws of that point's estimate.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradlab import GraphError
from gradlab.penalties import r1_penalty, r1_penalty_and_norms, r2_penalty, r2_penalty_and_norms
from tests.penalties._reference import CASES, loop_sq_norms, make_case

N = 20000  # draws per point: relative standard error sqrt(2/N) = 1%


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _arg(xs):
    return xs[0] if len(xs) == 1 else xs


def _within(samples: torch.Tensor, target: torch.Tensor | float, k: float = 4.0) -> None:
    """The mean of ``samples`` is within k standard errors of ``target``."""
    mean = samples.mean()
    se = samples.std() / math.sqrt(samples.numel())
    assert abs(mean - target) <= k * se, f"mean {mean.item()} target {float(target)} se {se.item()}"


@pytest.mark.parametrize("which", ["r1", "r2"])
@pytest.mark.parametrize("case", CASES)
def test_matches_the_formula_written_out(case, which):
    """gamma/(2 sigma^2) mean_i (sum_j D_ij(x_i + sigma eps_i) - D_ij(x_i))^2 with eps drawn as
    documented (one randn per input, in order, from the generator), and its parameter gradient."""
    critic, real, fake, kwargs = make_case(case, dtype=torch.float64)
    xs = real if which == "r1" else fake
    fn = r1_penalty_and_norms if which == "r1" else r2_penalty_and_norms
    sigma, gamma = 0.05, 3.0
    out = fn(
        critic,
        _arg(xs),
        gamma=gamma,
        critic_kwargs=kwargs,
        method="finite-difference",
        sigma=sigma,
        generator=_gen(5),
    )
    g = _gen(5)
    eps = [torch.randn(x.shape, dtype=x.dtype, generator=g) for x in xs]
    shifted = [x + sigma * e for x, e in zip(xs, eps)]
    diff = critic(*shifted, **kwargs) - critic(*xs, **kwargs)
    diff = diff.reshape(diff.shape[0], -1).sum(1)
    want = gamma / 2 * (diff**2 / sigma**2).mean()
    torch.testing.assert_close(out.penalty, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.norms, (diff.abs() / sigma).detach(), rtol=1e-12, atol=0)
    params = list(critic.parameters())
    got = torch.autograd.grad(out.penalty, params, allow_unused=True, materialize_grads=True)
    ref = torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_outputs_reuses_the_forward_and_gives_the_same_estimate():
    critic, real, _, _ = make_case("conv", dtype=torch.float64)
    x = real[0].detach().requires_grad_(True)
    logits = critic(x)
    kw = {"method": "finite-difference", "sigma": 0.01}
    with_outputs = r1_penalty(critic, x, outputs=logits, generator=_gen(1), **kw)
    without = r1_penalty(critic, real[0], generator=_gen(1), **kw)
    torch.testing.assert_close(with_outputs, without, rtol=1e-12, atol=0)
    (nn.functional.softplus(-logits).mean() + with_outputs).backward()
    assert x.grad is not None and all(p.grad is not None for p in critic.parameters())
    # the inputs need not require grad (no input gradient is taken)
    plain = real[0].detach()
    r1_penalty(critic, plain, outputs=critic(plain), **kw)


@pytest.mark.parametrize("case", ["conditional", "two-input"])
def test_outputs_with_critic_kwargs_and_tuples(case):
    """With outputs= the critic is still called on the perturbed samples, with critic_kwargs."""
    critic, real, _, kwargs = make_case(case, dtype=torch.float64)
    kw = {"method": "finite-difference", "sigma": 0.01, "critic_kwargs": kwargs}
    logits = critic(*real, **kwargs)
    got = r1_penalty(critic, _arg(real), outputs=logits, generator=_gen(4), **kw)
    want = r1_penalty(critic, _arg(real), generator=_gen(4), **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["r1", "r2"])
def test_linear_critic_is_unbiased_with_chi_square_variance(which):
    """D(x) = w.x + b: the estimate is (w.eps)^2 exactly, E = ||w||^2, Var = 2 ||w||^4."""
    torch.manual_seed(0)
    critic = nn.Linear(5, 1).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    sigma = 0.7  # no bias at any sigma for a linear critic
    fn = r1_penalty_and_norms if which == "r1" else r2_penalty_and_norms
    est = fn(critic, x, gamma=2.0, method="finite-difference", sigma=sigma, generator=_gen(0))
    est = est.norms**2
    w2 = critic.weight.detach().square().sum()
    _within(est, w2)
    assert est.var().item() == pytest.approx(2 * w2.item() ** 2, rel=0.12)  # ~4 SE of s^2
    exact = r1_penalty(critic, x[:4], gamma=2.0)
    torch.testing.assert_close(exact, w2)


def test_parameter_gradient_is_unbiased_for_a_linear_critic():
    """d/dw of gamma/2 (w.eps)^2 is gamma (w.eps) eps, whose mean is gamma w: the exact R1
    gradient. Each component within 4 standard errors of the per-sample contributions."""
    torch.manual_seed(1)
    critic = nn.Linear(3, 1).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    gamma = 4.0
    fd = r1_penalty(critic, x, gamma=gamma, method="finite-difference", generator=_gen(2))
    (got,) = torch.autograd.grad(fd, critic.weight)
    (exact,) = torch.autograd.grad(r1_penalty(critic, x[:3], gamma=gamma), critic.weight)
    eps = torch.randn(x.shape, dtype=x.dtype, generator=_gen(2))
    per_sample = gamma * (eps @ critic.weight.detach().T) * eps  # (N, 3)
    torch.testing.assert_close(got[0], per_sample.mean(0), rtol=1e-10, atol=1e-12)
    for j in range(3):
        _within(per_sample[:, j], exact[0, j])


class _Quadratic(nn.Module):
    """D(x) = g.x + x^T A x / 2: gradient g + A x, Hessian A, third derivative 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        gen = _gen(3)
        self.g = nn.Parameter(torch.randn(d, dtype=torch.float64, generator=gen))
        m = torch.randn(d, d, dtype=torch.float64, generator=gen)
        self.a = nn.Parameter((m + m.T) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.g + 0.5 * ((x @ self.a) * x).sum(1)


def test_quadratic_critic_bias_is_the_documented_sigma_squared_term():
    """E[est] = ||g + A x||^2 + sigma^2/4 ((tr A)^2 + 2 ||A||_F^2), exactly. With a large sigma
    the bias is many standard errors (the test sees it); with a small sigma it is negligible."""
    d = 4
    critic = _Quadratic(d)
    point = torch.randn(1, d, dtype=torch.float64, generator=_gen(4))
    x = point.expand(N, d)
    grad = (critic.g + critic.a @ point[0]).detach()
    a = critic.a.detach()
    curvature = (torch.trace(a) ** 2 + 2 * a.square().sum()) / 4
    exact = r1_penalty_and_norms(critic, point, gamma=2.0).norms ** 2
    torch.testing.assert_close(exact[0], grad.square().sum())

    def estimates(sigma: float, seed: int) -> torch.Tensor:
        out = r1_penalty_and_norms(
            critic, x, gamma=2.0, method="finite-difference", sigma=sigma, generator=_gen(seed)
        )
        return out.norms.double() ** 2

    big = estimates(1.0, 5)
    _within(big, exact[0] + curvature)
    se = big.std() / math.sqrt(N)
    assert curvature > 8 * se  # the bias is real and the test above can tell it apart
    _within(estimates(1e-3, 6), exact[0])  # bias 1e-6 * curvature: far below the error


@pytest.mark.parametrize("case", ["mlp", "conv", "two-input"])
def test_nonlinear_critic_small_sigma_matches_exact_r1_in_mean(case):
    """A smooth nonlinear critic, sigma = 1e-4 (bias O(1e-8) relative), float64: the mean of the
    estimates at each of 3 points is within 4 standard errors of the exact squared norm."""
    critic, real, _, _ = make_case(case, batch=3, dtype=torch.float64)
    reps = 4000 if case != "mlp" else N
    xs = tuple(t.repeat_interleave(reps, dim=0) for t in real)
    est = (
        r1_penalty_and_norms(
            critic, _arg(xs), method="finite-difference", sigma=1e-4, generator=_gen(7)
        ).norms
        ** 2
    )
    exact = loop_sq_norms(critic, real).detach()
    for i in range(3):
        _within(est[i * reps : (i + 1) * reps], exact[i])


def test_runs_through_torch_compile_where_exact_is_refused():
    critic = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(critic, backend="aot_eager")
    x = torch.randn(6, 3)
    with pytest.raises(GraphError, match=r"r1_penalty: critic is compiled"):
        r1_penalty(compiled, x)
    got = r1_penalty(compiled, x, method="finite-difference", generator=_gen(0))
    want = r1_penalty(critic, x, method="finite-difference", generator=_gen(0))
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is not None for p in critic.parameters())


def test_works_under_no_grad_and_leaves_no_trace():
    critic, real, _, _ = make_case("mlp")
    x = real[0]
    before = x.clone()
    version = x._version
    with torch.no_grad():
        r2 = r2_penalty(critic, x, method="finite-difference")
    assert r2.requires_grad and not x.requires_grad
    assert torch.equal(x, before) and x._version == version
    assert all(p.grad is None for p in critic.parameters())
    assert torch.is_grad_enabled()  # the estimator's enable_grad did not leak


def test_default_sigma_is_documented_value():
    critic = nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    a = r1_penalty(critic, x, method="finite-difference", generator=_gen(0))
    b = r1_penalty(critic, x, method="finite-difference", sigma=0.01, generator=_gen(0))
    assert torch.equal(a, b)


def test_errors():
    critic = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    fd = {"method": "finite-difference"}
    with pytest.raises(ValueError, match=r"r1_penalty: method must be one of 'exact', 'finite-"):
        r1_penalty(critic, x, method="fd")
    with pytest.raises(
        ValueError, match=r"r2_penalty: sigma must be None with method='exact'.*got 0.1"
    ):
        r2_penalty(critic, x, sigma=0.1)
    with pytest.raises(ValueError, match=r"r1_penalty: generator must be None with method='exact'"):
        r1_penalty(critic, x, generator=_gen())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"r1_penalty: sigma must be a finite number > 0"):
            r1_penalty(critic, x, sigma=bad, **fd)
    with pytest.raises(
        TypeError, match=r"r1_penalty: sigma must be a finite number > 0, got \'0.1\'"
    ):
        r1_penalty(critic, x, sigma="0.1", **fd)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scaler must be None with method='finite-difference'"):
        r1_penalty(critic, x, scaler=torch.amp.GradScaler("cpu"), **fd)
    xl = x.clone().requires_grad_(True)
    with pytest.raises(
        ValueError,
        match=r"outputs must be the critic's output on these inputs, of shape \(4, 1\)",
    ):
        r1_penalty(critic, xl, outputs=critic(xl).expand(4, 2), **fd)
    with pytest.raises(GraphError, match=r"r1_penalty: outputs does not require grad"):
        r1_penalty(critic, x, outputs=critic(x).detach(), **fd)
    with pytest.raises(
        ValueError, match=r"the critic's output must be a tensor with the batch of 4 first"
    ):
        r1_penalty(lambda t: critic(t).mean(), x, **fd)


def test_under_bfloat16_autocast_the_difference_is_taken_in_float32():
    """The critic runs in bfloat16; the estimate is float32 and close to the float32 one for a
    sigma large against bfloat16's rounding of D (the docstring's advice)."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(256, 6)
    kw = {"method": "finite-difference", "sigma": 0.5}
    ref = r1_penalty(critic, x, generator=_gen(3), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = r1_penalty(critic, x, generator=_gen(3), **kw)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - ref.item()) < 0.1 * ref.item()


class _DefaultLabelCritic(nn.Module):
    """A conditional critic whose labels default to None (the unconditional head): called
    without its labels it silently computes something else, the README pattern's trap."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.out = nn.Linear(8, 1)
        self.embed = nn.Embedding(3, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        f = self.phi(x)
        score = self.out(f).squeeze(1)
        return score if labels is None else score + 10 * (self.embed(labels) * f).sum(1)


def test_outputs_from_a_call_with_labels_but_no_critic_kwargs_is_refused():
    """r1_penalty(critic, x, outputs=critic(x, labels=y), method="finite-difference") without
    critic_kwargs would difference D(x + s e) (no labels) against D(x, y): an estimate off by
    orders of magnitude. The first use checks that the critic reproduces outputs."""
    critic = _DefaultLabelCritic().double()
    x = torch.randn(512, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (512,))
    fd = {"method": "finite-difference", "sigma": 1e-3}
    outputs = critic(x, labels=y)
    with pytest.raises(ValueError, match=r"r1_penalty: outputs must be what critic\(x, \*\*critic"):
        r1_penalty(critic, x, outputs=outputs, generator=0, **fd)
    with pytest.raises(ValueError, match=r"critic_kwargs=\{'labels': y\}"):
        r1_penalty(critic, x, outputs=outputs, generator=0, **fd)  # refused every time
    # stated, the estimate agrees with exact R1 (unbiased up to sigma^2: 4 standard errors)
    kw = {"labels": y}
    got = r1_penalty_and_norms(critic, x, outputs=outputs, critic_kwargs=kw, generator=0, **fd)
    exact = loop_sq_norms(critic, (x,), kw)
    _within(5.0 * got.norms.detach() ** 2, 5.0 * exact.detach().mean())
    # checked once per critic and keyword names: the next calls add no forward
    calls = critic.calls
    r1_penalty(critic, x, outputs=critic(x, labels=y), critic_kwargs=kw, generator=1, **fd)
    assert critic.calls == calls + 2  # the caller's forward and the perturbed one


def test_outputs_check_accepts_rounding_and_runs_under_autocast():
    """A repeated forward reproduces outputs up to rounding, far below the tolerance (the
    square root of the dtype's epsilon), also in bfloat16 under autocast."""
    critic = _DefaultLabelCritic()
    x = torch.randn(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = critic(x)
        p = r1_penalty(critic, x, outputs=out, method="finite-difference", sigma=0.5, generator=0)
    assert torch.isfinite(p)
