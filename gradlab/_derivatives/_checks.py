"""Argument checks shared by jacobian, hessian, hvp, vjp and jvp: the derivatives' domain checks
(argnums, differentiable leaves, structures like another's), built on :mod:`gradlab._validate`
and worded with its one template ``"{fn}: {name} must be ..., got {value!r}. {fix}"``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._keys import signature
from gradlab._derivatives._tree import flatten
from gradlab._typing import PyTree, TensorFn
from gradlab._validate import check_callable, check_int, message

__all__ = [
    "Argnums",
    "call_scalar",
    "check_call",
    "check_diff_leaves",
    "check_like",
    "devices_of",
    "numel",
    "outputs",
    "primals",
    "scalar",
]

Argnums = int | tuple[int, ...]


def check_diff_leaves(fn: str, what: str, tree: PyTree) -> list[torch.Tensor]:
    # a bare tensor (the usual argument) is its own only leaf: no pytree walk on every call
    leaves = [tree] if isinstance(tree, torch.Tensor) else flatten(tree)[0]
    if not leaves:
        raise ValueError(
            message(fn, what, "a tensor or a tuple/dict of tensors", tree, "Pass tensors")
        )
    for i, t in enumerate(leaves):
        name = what if isinstance(tree, torch.Tensor) else f"{what} (leaf {i})"
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                message(
                    fn,
                    name,
                    "a tensor",
                    t,
                    "Only tensors can be differentiated; close over other values in f instead",
                )
            )
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                message(
                    fn,
                    name,
                    "a floating-point tensor",
                    t,
                    "Integer tensors cannot be differentiated; convert with .double() or .float()",
                )
            )
    return leaves


def check_call(
    fn: str, f: Callable[..., Any], args: tuple, argnums: Argnums, chunk_size: int | None
) -> tuple[int, ...]:
    """Validate f/args/argnums/chunk_size; return argnums as a tuple of non-negative ints."""
    check_callable(fn, "f", f, what="a callable (the function to differentiate)")
    if not args:
        raise ValueError(
            message(fn, "args", "f's arguments (at least one)", args, f"Call {fn}(f, x, ...)")
        )
    if chunk_size is not None:
        check_int(fn, "chunk_size", chunk_size, minimum=1, fix="Pass None or a positive int")
    many = isinstance(argnums, tuple)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    if not nums:
        raise ValueError(
            message(fn, "argnums", "an int or a non-empty tuple of ints", argnums, "Pass argnums=0")
        )
    out = []
    for a in nums:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(
                message(fn, "argnums", "an int or a tuple of ints", argnums, "Pass argnums=0")
            )
        if not -len(args) <= a < len(args):
            raise ValueError(
                message(
                    fn,
                    "argnums",
                    f"in range for {len(args)} argument(s)",
                    argnums,
                    f"Use 0..{len(args) - 1}",
                )
            )
        out.append(a % len(args))
    if len(set(out)) != len(out):
        raise ValueError(
            message(fn, "argnums", "distinct arguments", argnums, "List each argument once")
        )
    for a in out:
        check_diff_leaves(fn, f"argument {a}" if many or a else "x", args[a])
    return tuple(out)


def _reads_data(exc: RuntimeError) -> bool:
    """Whether ``exc`` is torch.func refusing a read of a transformed tensor's data (``.numpy()``,
    ``.tolist()``, ``data_ptr``), i.e. ``f`` left torch."""
    text = str(exc)
    return "doesn't have storage" in text or "data pointer" in text


def _left_torch(fn: str, exc: RuntimeError) -> ValueError:
    return ValueError(
        message(
            fn,
            "f",
            "computed with torch operations on its tensor arguments",
            "a function that reads their data (.numpy(), .tolist() or data_ptr)",
            "Keep f in torch: derivatives cannot pass through numpy arrays or Python numbers",
        )
    )


def outputs(fn: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap f so that an output that is not a tensor (or a pytree of tensors), or an f that
    leaves torch (``.numpy()``), raises a clear error inside any transform."""

    def g(*a: Any) -> Any:
        out = _call(fn, f, a)
        if isinstance(out, torch.Tensor):
            return out
        leaves = pytree.tree_leaves(out)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise ValueError(
                message(
                    fn,
                    "f",
                    "a function returning a tensor or a tuple/list/dict of tensors",
                    out,
                    "Return torch tensors computed from the arguments (not numpy arrays, Python "
                    "numbers or None)",
                )
            )
        return out

    return g


def _call(fn: str, f: Callable[..., Any], args: tuple) -> Any:
    """``f(*args)``; an ``f`` that leaves torch (``.numpy()`` inside a transform) raises a clear
    error (:func:`outputs` and :func:`call_scalar` check the result)."""
    try:
        return f(*args)
    except RuntimeError as exc:
        if _reads_data(exc):
            raise _left_torch(fn, exc) from exc
        raise


def scalar(fn: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap f so that a non-scalar result raises a clear error inside any transform."""

    def g(*a: Any) -> torch.Tensor:
        return call_scalar(fn, f, a)

    return g


def call_scalar(fn: str, f: Callable[..., Any], args: tuple) -> torch.Tensor:
    """``f(*args)``, with the checks of :func:`scalar` (which wraps this), without a wrapper
    function per call (for the autograd strategies, which call ``f`` directly)."""
    out = _call(fn, f, args)
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        raise ValueError(
            message(
                fn,
                "f",
                "a function returning a scalar (0-dim) tensor",
                out,
                "Reduce its output (e.g. .sum() or .mean()), or use jacobian for "
                "vector-valued functions",
            )
        )
    return out


def devices_of(tree: PyTree) -> list[torch.device]:
    seen: dict[str, torch.device] = {}
    for t in flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            seen.setdefault(str(t.device), t.device)
    return list(seen.values())


def numel(tree: PyTree) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def primals(fn: str, args: Any) -> tuple[tuple, bool]:
    """``args`` as the tuple of f's positional arguments, and whether it was a single one."""
    if isinstance(args, (tuple, list)):
        if not args:
            raise ValueError(
                message(fn, "args", "f's argument(s)", args, "Pass a tensor, tuple or dict")
            )
        return tuple(args), False
    return (args,), True


def check_like(fn: str, name: str, v: Any, ref: Any, ref_name: str) -> None:
    """``v`` must have ``ref``'s structure, shapes and dtypes."""
    v_leaves, v_spec = flatten(v)
    r_leaves, r_spec = flatten(ref)
    if v_spec != r_spec:
        v_spec, r_spec = pytree.tree_flatten(v)[1], pytree.tree_flatten(ref)[1]  # for the text
        raise ValueError(
            message(
                fn,
                name,
                f"structured like {ref_name} ({r_spec})",
                v_spec,
                f"Pass {name} with exactly the structure of {ref_name}",
            )
        )
    for i, (a, b) in enumerate(zip(v_leaves, r_leaves)):
        leaf = f"{name} (leaf {i})"
        if not isinstance(a, torch.Tensor):
            raise TypeError(message(fn, leaf, "a tensor", a, f"Pass tensors like {ref_name}"))
        if a.shape != b.shape:
            raise ValueError(
                message(
                    fn, leaf, f"of shape {tuple(b.shape)} like {ref_name}", a, "They must match"
                )
            )
        if a.dtype != b.dtype:
            raise TypeError(
                message(fn, leaf, f"of dtype {b.dtype} like {ref_name}", a, f"Use .to({b.dtype})")
            )
        if a.device != b.device:
            raise ValueError(
                message(
                    fn,
                    leaf,
                    f"on {b.device} like {ref_name}",
                    a,
                    f"Move it with .to({str(b.device)!r})",
                )
            )


class ArgnumsProblem:
    """A validated ``jacobian``/``hessian`` call (``argnums`` non-negative, ``nums`` a tuple).

    A plain slotted class, not a frozen dataclass: it is built on every call, and a frozen
    dataclass's ``__init__`` costs several microseconds of the cheapest calls' overhead.
    """

    __slots__ = ("argnums", "args", "chunk_size", "f", "n_out", "nums")
    keep = None  # results keep a graph when grad mode is on (see Operation.run)

    def __init__(
        self,
        f: TensorFn,
        args: tuple,
        argnums: Argnums,
        nums: tuple[int, ...],
        chunk_size: int | None,
    ) -> None:
        self.f = f
        self.args = args
        self.argnums = argnums
        self.nums = nums
        self.chunk_size = chunk_size
        self.n_out: int | None = None  # the output's size, once a call has seen it

    @classmethod
    def validated(
        cls, fn: str, f: TensorFn, args: tuple, argnums: Argnums, chunk_size: int | None
    ) -> ArgnumsProblem:
        nums = check_call(fn, f, args, argnums, chunk_size)
        # Non-negative argnums for torch.func: jacfwd mishandles negative ones (torch 2.13).
        return cls(f, args, nums if isinstance(argnums, tuple) else nums[0], nums, chunk_size)

    @property
    def many(self) -> bool:
        return isinstance(self.argnums, tuple)

    def key(self) -> tuple:
        return (signature(self.args), self.argnums, self.chunk_size, torch.is_grad_enabled())

    def devices(self) -> Sequence[torch.device]:
        return devices_of(self.args)
