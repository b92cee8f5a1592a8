"""Argument checks shared by jacobian, hessian, hvp, vjp and jvp (one message format)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from gradlab._derivatives._keys import signature
from gradlab._typing import PyTree, TensorFn

__all__ = [
    "Argnums",
    "check_call",
    "check_diff_leaves",
    "check_like",
    "devices_of",
    "numel",
    "primals",
    "scalar",
]

Argnums = int | tuple[int, ...]


def check_diff_leaves(fn: str, what: str, tree: PyTree) -> list[torch.Tensor]:
    # a bare tensor (the usual argument) is its own only leaf: no pytree walk on every call
    leaves = [tree] if isinstance(tree, torch.Tensor) else pytree.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{fn}: {what} contains no tensors; pass tensors to differentiate by")
    for i, t in enumerate(leaves):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{fn}: {what} contains a {type(t).__name__} (leaf {i}); only tensors can be "
                f"differentiated, close over other values in the function instead"
            )
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"{fn}: {what} has a tensor of dtype {t.dtype} (leaf {i}, shape "
                f"{tuple(t.shape)}); integer tensors cannot be differentiated, convert with "
                f".double() or .float()"
            )
    return leaves


def check_call(
    fn: str, f: Callable[..., Any], args: tuple, argnums: Argnums, chunk_size: int | None
) -> tuple[int, ...]:
    """Validate f/args/argnums/chunk_size; return argnums as a tuple of non-negative ints."""
    if not callable(f):
        raise TypeError(f"{fn}: f is a {type(f).__name__}, expected a callable")
    if not args:
        raise ValueError(f"{fn}: no arguments given; call {fn}(f, x, ...) with f's arguments")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{fn}: chunk_size={chunk_size!r}; pass None or a positive int")
    many = isinstance(argnums, tuple)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    if not nums:
        raise ValueError(f"{fn}: argnums=() is empty; pass an int or a non-empty tuple of ints")
    out = []
    for a in nums:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{fn}: argnums={argnums!r}; pass an int or a tuple of ints")
        if not -len(args) <= a < len(args):
            raise ValueError(
                f"{fn}: argnums={argnums!r} is out of range for {len(args)} argument(s); use "
                f"0..{len(args) - 1}"
            )
        out.append(a % len(args))
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: argnums={argnums!r} repeats an argument; list each once")
    for a in out:
        check_diff_leaves(fn, f"argument {a}" if many or a else "x", args[a])
    return tuple(out)


def scalar(fn: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap f so that a non-scalar result raises a clear error inside any transform."""

    def g(*a: Any) -> torch.Tensor:
        out = f(*a)
        if not isinstance(out, torch.Tensor) or out.ndim != 0:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(
                f"{fn}: f must return a scalar (0-dim) tensor, got {got}; reduce it (e.g. "
                f".sum() or .mean()), or use jacobian for vector-valued functions"
            )
        return out

    return g


def devices_of(tree: PyTree) -> list[torch.device]:
    seen: dict[str, torch.device] = {}
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen.setdefault(str(t.device), t.device)
    return list(seen.values())


def numel(tree: PyTree) -> int:
    return sum(t.numel() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def primals(fn: str, args: Any) -> tuple[tuple, bool]:
    """``args`` as the tuple of f's positional arguments, and whether it was a single one."""
    if isinstance(args, (tuple, list)):
        if not args:
            raise ValueError(f"{fn}: args is empty; pass f's argument(s)")
        return tuple(args), False
    return (args,), True


def check_like(fn: str, name: str, v: Any, ref: Any, ref_name: str) -> None:
    """``v`` must have ``ref``'s structure, shapes and dtypes."""
    v_leaves, v_spec = pytree.tree_flatten(v)
    r_leaves, r_spec = pytree.tree_flatten(ref)
    if v_spec != r_spec:
        raise ValueError(
            f"{fn}: {name} has structure {v_spec} but {ref_name} has {r_spec}; pass {name} "
            f"structured exactly like {ref_name}"
        )
    for i, (a, b) in enumerate(zip(v_leaves, r_leaves)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{fn}: {name} leaf {i} is a {type(a).__name__}, expected a tensor")
        if a.shape != b.shape:
            raise ValueError(
                f"{fn}: {name} leaf {i} has shape {tuple(a.shape)} but {ref_name} has "
                f"{tuple(b.shape)}; they must match"
            )
        if a.dtype != b.dtype:
            raise TypeError(
                f"{fn}: {name} leaf {i} has dtype {a.dtype} but {ref_name} has {b.dtype}; "
                f"convert it with .to({b.dtype})"
            )
        if a.device != b.device:
            raise ValueError(
                f"{fn}: {name} leaf {i} is on {a.device} but {ref_name} is on {b.device}; "
                f"move it with .to({str(b.device)!r})"
            )


class ArgnumsProblem:
    """A validated ``jacobian``/``hessian`` call (``argnums`` non-negative, ``nums`` a tuple).

    A plain slotted class, not a frozen dataclass: it is built on every call, and a frozen
    dataclass's ``__init__`` costs several microseconds of the cheapest calls' overhead.
    """

    __slots__ = ("argnums", "args", "chunk_size", "f", "nums")
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
