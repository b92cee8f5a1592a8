"""Output buffers for per-sample gradients: ``B x P`` numbers written once, in huge pages.

Storing per-sample gradients is bound by writing fresh memory: a new buffer of hundreds of
megabytes is mapped page by page, and every 4 KiB page costs a fault (the kernel's zeroing and
bookkeeping) before the first write lands; on CPU that costs more than the arithmetic that fills
it. Where Linux offers transparent huge pages on request (``madvise`` mode, the common default)
:func:`empty` asks for them on the 2 MiB-aligned interior of a large buffer before anything is
written (``madvise(MADV_HUGEPAGE)``, what ``THP_MEM_ALLOC_ENABLE=1`` does for every allocation of
PyTorch's CPU allocator): one fault per 2 MiB instead of 512. The buffer is an ordinary tensor of
PyTorch's allocator (freed as usual); the advice changes no content and nothing else. Elsewhere
(other systems, accelerators, small buffers, huge pages disabled) it is :func:`torch.empty`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

__all__ = ["empty"]

_HUGE = 2 << 20  # 2 MiB, the x86-64 and arm64 huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_MIN_BYTES = 2 * _HUGE  # smaller buffers come from reused heap memory, or gain little


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` where transparent huge pages can be asked for, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        if "[madvise]" not in mode:  # "[always]": every buffer gets them; "[never]": none
            return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`torch.empty` for a buffer about to be written whole; on CPU under Linux, a large
    one is backed by transparent huge pages where the system allows them on request."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return t
    madvise = _madvise()
    if madvise is not None:
        ptr = t.data_ptr()
        start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
        end = (ptr + nbytes) & ~(_HUGE - 1)
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice: a failure changes nothing
    return t
