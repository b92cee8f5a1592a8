"""Progress of a curvature run, counted in Hessian-vector products (batches x products)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator

import gradlab._validate as v
from gradlab.curvature._args import ProgressArg


class Progress:
    """Progress of a run counted in Hessian-vector products (the unit that dominates the cost).

    With ``data=`` of B batches one product of the dataset Hessian is B batch products and counts
    B. ``progress=True``: one status line on stderr, rewritten in place with ``\\r`` at most ten
    times a second (plus the first and the last update), ended by a newline. A callable: called
    as ``progress(done, total)`` after every batch of products. When a method stops early
    (converged), the last update reports ``(done, done)``, so a bar ends full. Products that a
    method finds it does not need (the exact diagonal by Hessian backpropagation runs none) are
    taken off the total as it finds so (:meth:`skip`): only products that run are counted.
    """

    interval = 0.1  # seconds between two printed updates

    def __init__(self, fn: str, progress: ProgressArg):
        if not isinstance(progress, bool) and not callable(progress):
            raise TypeError(
                v.message(
                    fn,
                    "progress",
                    "True, False or a callable progress(done, total)",
                    progress,
                    "Pass True for a status line on stderr",
                )
            )
        self.fn = fn
        self.callback = None if isinstance(progress, bool) else progress
        self.active = progress is True or self.callback is not None
        self.total = 0
        self.products = 0
        self.done = 0
        self.skipped = 0
        self.start = 0.0
        self.last = -math.inf
        self.width = 0

    @contextlib.contextmanager
    def run(self, products: int, batches: int | None = 1) -> Iterator[None]:
        """Count ``products`` products of the Hessian, each ``batches`` batch products.

        ``batches=None`` (data without ``len()``): counted as one until :meth:`set_batches`
        tells the number, after the first pass over the data.
        """
        self.products = products
        total = products * (batches or 1)
        self.total, self.done, self.skipped = total, 0, 0
        self.start = time.perf_counter()
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

    def set_batches(self, batches: int) -> None:
        """The number of batches, once a first pass over data without ``len()`` has counted it."""
        self.total = self.products * batches - self.skipped
        if self.callback is not None:
            self.callback(self.done, self.total)

    def skip(self, n: int) -> None:
        """``n`` of the counted products will not run: the total shrinks by ``n``."""
        if not self.active:
            return
        self.skipped += n
        self.total = max(self.done, self.total - n)  # data without len(): fixed by set_batches
        if self.callback is not None:
            self.callback(self.done, self.total)
        elif time.perf_counter() - self.last >= self.interval:
            self._print(final=False)

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
        line = f"{self.fn}: {self.done}/{self.total} Hessian-vector products"
        if self.skipped:
            line += f" ({self.skipped} not needed)"
        line += f", {elapsed:.1f} s"
        if not final and self.done:
            line += f", ETA {elapsed / self.done * (self.total - self.done):.1f} s"
        sys.stderr.write("\r" + line.ljust(self.width) + ("\n" if final else ""))
        sys.stderr.flush()
        self.width = len(line)
        self.last = now
