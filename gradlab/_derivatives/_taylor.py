"""Taylor-mode (jet) propagation for k-th derivatives of elementwise functions.

``x`` is replaced by the truncated Taylor series ``x + t`` (coefficients ``[x, 1, 0, ..., 0]``)
and every elementwise op maps the input coefficients to the output coefficients with the classic
recurrences (Griewank & Walther, *Evaluating Derivatives*, ch. 13): products are Cauchy products,
``exp``/``log``/``sin``/``cos``/``tanh``/``sigmoid``/powers use their ODE recurrences. The cost is
O(k^2) tensor ops per op at worst and O(k) for a unary op of ``x`` itself.

Anything the rules do not cover is reported as :class:`UnsupportedOp`: an op without a rule, a
comparison, indexing, a data-dependent branch, and any op run with grad mode off (inside
``torch.no_grad()`` or a custom ``torch.autograd.Function``, whose backward may not be the
derivative of its forward: reverse mode is the reference there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradlab._derivatives._registry import StrategyUnsupported
from gradlab._validate import message

__all__ = ["Jet", "UnsupportedOp", "check_shape", "taylor"]

Coef = torch.Tensor | float | None


class UnsupportedOp(StrategyUnsupported):
    """Raised when a function uses something Taylor mode does not implement."""

    def __init__(self, what: str) -> None:
        super().__init__(f"Taylor mode does not support {what}")


def _guard() -> None:
    """Every Jet operation runs under grad mode (taylor() turns it on): off means an op inside
    ``torch.no_grad()`` or a custom autograd.Function's forward, which Taylor mode cannot see."""
    if not torch.is_grad_enabled():
        raise UnsupportedOp(
            "ops run with grad mode off (torch.no_grad() or a custom autograd.Function)"
        )


def _mul(a: Coef, b: Coef) -> Coef:
    if a is None or b is None:
        return None
    if isinstance(a, float) and isinstance(b, float):
        return a * b
    if isinstance(a, float):
        return b if a == 1.0 else a * b  # type: ignore[operator]
    if isinstance(b, float):
        return a if b == 1.0 else a * b
    return a * b


def _add(a: Coef, b: Coef) -> Coef:
    if a is None:
        return b
    if b is None:
        return a
    return a + b  # type: ignore[operator]


def _scale(c: float, a: Coef) -> Coef:
    if a is None or c == 0.0:
        return None
    if c == 1.0:
        return a
    return c * a  # type: ignore[operator]


def _dot(pairs: Sequence[tuple[float, Coef, Coef]]) -> Coef:
    """sum_j w_j * a_j * b_j, skipping exact zeros."""
    acc: Coef = None
    for w, a, b in pairs:
        acc = _add(acc, _scale(w, _mul(a, b)))
    return acc


def _div(a: Coef, b: Coef) -> Coef:
    if a is None:
        return None
    return a / b  # type: ignore[operator]


class Jet:
    """Truncated Taylor series ``sum_j c_j t^j`` of a tensor-valued path (j = 0..order).

    A tensor-like: torch functions called on a Jet dispatch here through ``__torch_function__``.
    """

    def __init__(self, coefs: list[Coef]) -> None:
        self.c = coefs

    @property
    def order(self) -> int:
        return len(self.c) - 1

    @property
    def primal(self) -> torch.Tensor:
        return self.c[0]  # type: ignore[return-value]

    # attributes user code commonly reads
    @property
    def shape(self) -> torch.Size:
        return self.primal.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.primal.dtype

    @property
    def device(self) -> torch.device:
        return self.primal.device

    @property
    def ndim(self) -> int:
        return self.primal.ndim

    def size(self, *a: int) -> Any:
        return self.primal.size(*a)

    def dim(self) -> int:
        return self.primal.dim()

    def numel(self) -> int:
        return self.primal.numel()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        _guard()
        name = getattr(func, "__name__", str(func)).strip("_")
        rule = _RULES.get(name)
        if rule is None:
            raise UnsupportedOp(f"the op {name}")
        return rule(*args, **(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols (copy, pickle, numpy): not a tensor method
            raise AttributeError(name)
        _guard()
        rule = _RULES.get(name)
        if rule is None:
            raise UnsupportedOp(f"the op {name}")
        return lambda *a, **k: rule(self, *a, **k)

    def __add__(self, o: Any) -> Jet:
        _guard()
        return _j_add(self, o)

    __radd__ = __add__

    def __sub__(self, o: Any) -> Jet:
        _guard()
        return _j_sub(self, o)

    def __rsub__(self, o: Any) -> Jet:
        _guard()
        return _j_sub(o, self)

    def __mul__(self, o: Any) -> Jet:
        _guard()
        return _j_mul(self, o)

    __rmul__ = __mul__

    def __truediv__(self, o: Any) -> Jet:
        _guard()
        return _j_div(self, o)

    def __rtruediv__(self, o: Any) -> Jet:
        _guard()
        return _j_div(o, self)

    def __neg__(self) -> Jet:
        _guard()
        return _j_neg(self)

    def __pos__(self) -> Jet:
        return self

    def __pow__(self, o: Any) -> Jet:
        _guard()
        return _j_pow(self, o)

    def __rpow__(self, o: Any) -> Jet:
        _guard()
        if isinstance(o, torch.Tensor):
            return _j_exp(_j_mul(self, torch.log(o)))
        return _j_exp(_j_mul(self, math.log(o)))


def _lift(x: Any, order: int) -> Jet:
    if isinstance(x, Jet):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
        raise UnsupportedOp(f"an operand of type {type(x).__name__}")
    return Jet([x if isinstance(x, torch.Tensor) else float(x)] + [None] * order)


def _order(*xs: Any) -> int:
    return next(x.order for x in xs if isinstance(x, Jet))


def _j_add(a: Any, b: Any, alpha: float = 1.0) -> Jet:
    k = _order(a, b)
    a, b = _lift(a, k), _lift(b, k)
    return Jet([_add(x, _scale(alpha, y)) for x, y in zip(a.c, b.c)])


def _j_sub(a: Any, b: Any, alpha: float = 1.0) -> Jet:
    return _j_add(a, b, -alpha)


def _j_neg(a: Jet) -> Jet:
    return Jet([_scale(-1.0, x) for x in a.c])


def _j_mul(a: Any, b: Any) -> Jet:
    k = _order(a, b)
    a, b = _lift(a, k), _lift(b, k)
    return Jet([_dot([(1.0, a.c[j], b.c[n - j]) for j in range(n + 1)]) for n in range(k + 1)])


def _j_div(a: Any, b: Any) -> Jet:
    k = _order(a, b)
    a, b = _lift(a, k), _lift(b, k)
    h: list[Coef] = []
    for n in range(k + 1):
        num = _add(a.c[n], _scale(-1.0, _dot([(1.0, h[j], b.c[n - j]) for j in range(n)])))
        h.append(_div(num, b.c[0]))
    return Jet(h)


def _integrate(a: Jet, g: Jet, h0: Coef) -> list[Coef]:
    """Coefficients of h with h' = g * a' (g known up to order k-1): h_n = 1/n sum j a_j g_{n-j}."""
    h = [h0]
    for n in range(1, a.order + 1):
        h.append(_dot([(j / n, a.c[j], g.c[n - j]) for j in range(1, n + 1)]))
    return h


def _j_exp(a: Jet) -> Jet:
    h: list[Coef] = [torch.exp(a.primal)]
    for n in range(1, a.order + 1):
        h.append(_dot([(j / n, a.c[j], h[n - j]) for j in range(1, n + 1)]))
    return Jet(h)


def _j_expm1(a: Jet) -> Jet:
    e = _j_exp(a)
    return Jet([torch.expm1(a.primal), *e.c[1:]])


def _j_log(a: Jet) -> Jet:
    h: list[Coef] = [torch.log(a.primal)]
    for n in range(1, a.order + 1):
        s = _dot([(j / n, h[j], a.c[n - j]) for j in range(1, n)])
        h.append(_div(_add(a.c[n], _scale(-1.0, s)), a.c[0]))
    return Jet(h)


def _j_log1p(a: Jet) -> Jet:
    return Jet([torch.log1p(a.primal), *_j_log(_j_add(a, 1.0)).c[1:]])


def _sincos(a: Jet, want: str = "both") -> tuple[Jet, Jet]:
    """sin and cos series together (each needs the other); the last coefficient only as wanted."""
    s: list[Coef] = [torch.sin(a.primal)]
    c: list[Coef] = [torch.cos(a.primal)]
    k = a.order
    for n in range(1, k + 1):
        last = n == k
        s.append(
            _dot([(j / n, a.c[j], c[n - j]) for j in range(1, n + 1)])
            if not last or want != "cos"
            else None
        )
        c.append(
            _dot([(-j / n, a.c[j], s[n - j]) for j in range(1, n + 1)])
            if not last or want != "sin"
            else None
        )
    return Jet(s), Jet(c)


def _sinhcosh(a: Jet) -> tuple[Jet, Jet]:
    s: list[Coef] = [torch.sinh(a.primal)]
    c: list[Coef] = [torch.cosh(a.primal)]
    for n in range(1, a.order + 1):
        s.append(_dot([(j / n, a.c[j], c[n - j]) for j in range(1, n + 1)]))
        c.append(_dot([(j / n, a.c[j], s[n - j]) for j in range(1, n + 1)]))
    return Jet(s), Jet(c)


def _riccati(a: Jet, h0: torch.Tensor, u: Callable[[list[Coef], int], Coef]) -> Jet:
    """h' = u(h) a' where u_m depends on h_0..h_m (tanh: 1 - h^2, sigmoid: h - h^2)."""
    h: list[Coef] = [h0]
    us: list[Coef] = [u(h, 0)]
    for n in range(1, a.order + 1):
        h.append(_dot([(j / n, a.c[j], us[n - j]) for j in range(1, n + 1)]))
        if n < a.order:
            us.append(u(h, n))
    return Jet(h)


def _square_series(h: list[Coef], m: int) -> Coef:
    return _dot([(1.0, h[i], h[m - i]) for i in range(m + 1)])


def _j_tanh(a: Jet) -> Jet:
    def u(h: list[Coef], m: int) -> Coef:
        sq = _square_series(h, m)
        return _add(1.0 if m == 0 else None, _scale(-1.0, sq))

    return _riccati(a, torch.tanh(a.primal), u)


def _j_sigmoid(a: Jet) -> Jet:
    def u(h: list[Coef], m: int) -> Coef:
        return _add(h[m], _scale(-1.0, _square_series(h, m)))

    return _riccati(a, torch.sigmoid(a.primal), u)


def _j_pow(a: Any, r: Any) -> Jet:
    if isinstance(r, Jet) or isinstance(r, torch.Tensor):
        if isinstance(a, Jet) or isinstance(r, Jet):
            return _j_exp(_j_mul(r, _j_log(_lift(a, _order(a, r)))))
    if not isinstance(a, Jet):
        raise UnsupportedOp("the op pow with a Jet exponent of a number")
    r = float(r)
    if r.is_integer() and 0 <= r <= 64:
        n = int(r)
        result: Jet = _lift(torch.ones_like(a.primal), a.order)
        base = a
        while n:
            if n & 1:
                result = _j_mul(result, base)
            n >>= 1
            if n:
                base = _j_mul(base, base)
        return result
    h: list[Coef] = [torch.pow(a.primal, r)]
    for n in range(1, a.order + 1):
        s = _dot([(((r + 1) * j - n) / n, a.c[j], h[n - j]) for j in range(1, n + 1)])
        h.append(_div(s, a.c[0]))
    return Jet(h)


def _j_sqrt(a: Jet) -> Jet:
    return _j_pow(a, 0.5)


def _j_rsqrt(a: Jet) -> Jet:
    return _j_pow(a, -0.5)


def _j_reciprocal(a: Jet) -> Jet:
    return _j_div(1.0, a)


def _j_square(a: Jet) -> Jet:
    return _j_mul(a, a)


def _j_erf(a: Jet) -> Jet:
    g = _j_mul(_j_exp(_j_neg(_j_mul(a, a))), 2.0 / math.sqrt(math.pi))
    return Jet(_integrate(a, g, torch.erf(a.primal)))


def _j_atan(a: Jet) -> Jet:
    g = _j_div(1.0, _j_add(_j_mul(a, a), 1.0))
    return Jet(_integrate(a, g, torch.atan(a.primal)))


def _j_softplus(a: Jet, beta: float = 1.0, threshold: float = 20.0) -> Jet:
    if beta != 1.0:
        return _j_mul(_j_softplus(_j_mul(a, beta)), 1.0 / beta)
    return Jet(_integrate(a, _j_sigmoid(a), torch.nn.functional.softplus(a.primal)))


def _j_relu(a: Jet, inplace: bool = False) -> Jet:
    slope = (a.primal > 0).to(a.dtype)
    return Jet([torch.relu(a.primal), *[_mul(c, slope) for c in a.c[1:]]])


def _j_abs(a: Jet) -> Jet:
    slope = torch.sign(a.primal)
    return Jet([torch.abs(a.primal), *[_mul(c, slope) for c in a.c[1:]]])


def _j_gelu(a: Jet, approximate: str = "none") -> Jet:
    if approximate != "none":
        raise UnsupportedOp("the op gelu(approximate='tanh')")
    return _j_mul(_j_mul(a, 0.5), _j_add(_j_erf(_j_mul(a, 1.0 / math.sqrt(2.0))), 1.0))


def _j_silu(a: Jet, inplace: bool = False) -> Jet:
    return _j_mul(a, _j_sigmoid(a))


def _j_rsub(a: Any, b: Any, alpha: float = 1.0) -> Jet:
    return _j_sub(b, a, alpha)


def _reduction(a: Jet, *args: Any, **kwargs: Any) -> Jet:
    raise ValueError(
        message(
            "derivative",
            "f",
            "elementwise (an output of the input's shape)",
            "a function that reduces its input",
            "Return the elementwise values, not their sum",
        )
    )


_RULES: dict[str, Callable[..., Jet]] = {
    "sum": _reduction,
    "mean": _reduction,
    "prod": _reduction,
    "add": _j_add,
    "radd": lambda a, b: _j_add(b, a),
    "sub": _j_sub,
    "rsub": _j_rsub,
    "mul": _j_mul,
    "rmul": lambda a, b: _j_mul(b, a),
    "div": _j_div,
    "truediv": _j_div,
    "rtruediv": lambda a, b: _j_div(b, a),
    "neg": _j_neg,
    "negative": _j_neg,
    "pow": _j_pow,
    "rpow": lambda a, b: Jet.__rpow__(a, b),
    "exp": _j_exp,
    "expm1": _j_expm1,
    "log": _j_log,
    "log1p": _j_log1p,
    "sin": lambda a: _sincos(a, "sin")[0],
    "cos": lambda a: _sincos(a, "cos")[1],
    "sinh": lambda a: _sinhcosh(a)[0],
    "cosh": lambda a: _sinhcosh(a)[1],
    "tan": lambda a: _j_div(*_sincos(a)),
    "tanh": _j_tanh,
    "sigmoid": _j_sigmoid,
    "sqrt": _j_sqrt,
    "rsqrt": _j_rsqrt,
    "reciprocal": _j_reciprocal,
    "square": _j_square,
    "erf": _j_erf,
    "atan": _j_atan,
    "arctan": _j_atan,
    "softplus": _j_softplus,
    "relu": _j_relu,
    "abs": _j_abs,
    "gelu": _j_gelu,
    "silu": _j_silu,
}


def check_shape(out: Any, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(
            message(
                "derivative",
                "f",
                f"elementwise (an output of the input's shape {tuple(x.shape)})",
                out if isinstance(out, torch.Tensor) else type(out).__name__,
                "Return the elementwise values, not their sum",
            )
        )
    return out


def taylor(f: Callable[[Any], Any], x: torch.Tensor, order: int) -> torch.Tensor:
    """The ``order``-th derivative of elementwise ``f`` at ``x`` by jet propagation.

    Runs under grad mode (so that ops under ``torch.no_grad()`` or inside a custom
    ``autograd.Function`` are detected); the result has a graph where the coefficients do.

    Raises:
        UnsupportedOp: ``f`` does something the rules do not cover (any exception other than a
            ``ValueError`` raised while ``f`` runs on the jet is reported as such).
        ValueError: ``f`` is not shape-preserving, or raised a ``ValueError`` itself.
    """
    coefs: list[Coef] = [x, 1.0]
    coefs += [None] * (order - 1)
    jet = Jet(coefs)
    with torch.enable_grad():
        try:
            out = f(jet)
        except (ValueError, UnsupportedOp):
            raise
        except Exception as exc:  # comparisons, indexing, branches on values, ...
            raise UnsupportedOp(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Jet):
        raise UnsupportedOp(f"f returning a {type(out).__name__}")
    check_shape(out.primal, x)
    c = out.c[order]
    if c is None or isinstance(c, float):
        return torch.full_like(x, 0.0 if c is None else c * math.factorial(order))
    return c * float(math.factorial(order))
