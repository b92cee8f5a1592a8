"""The freeze tests run tiny models: one intra-op thread is as fast and does not stall when the
machine is shared (with two threads on a loaded 2-core machine these tests ran ~10x slower)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
