"""Every ```python block of README.md and docs/**/*.md runs, top to bottom, one namespace per file.

A block whose info string is ``python skip`` is not run (used sparingly: multi-process launch
snippets). The blocks run in a temporary working directory, so files they write go there. Test
functions a page defines (``def test_...():`` without arguments, the hypothesis examples) are
called after the page's last block, as pytest would call them in a test file. Autotuning's
timing runs are switched off (``gl.autotune(False)``: the same results by contract, less time).
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch

import gradlab as gl
from tests.docs._blocks import ROOT, blocks, markdown_files

FILES = markdown_files()


def _id(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", FILES, ids=[_id(p) for p in FILES])
def test_python_blocks_run_top_to_bottom(path, tmp_path, monkeypatch):
    runnable = [b for b in blocks(path) if b.runnable]
    if not runnable:
        pytest.skip(f"{_id(path)} has no runnable python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    rng = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings(), gl.autotune(False):
            warnings.simplefilter("ignore")
            for block in runnable:
                code = compile(block.code, f"{_id(path)}:{block.line}", "exec")
                try:
                    exec(code, namespace)
                except Exception as e:
                    raise AssertionError(
                        f"the python block at {_id(path)}:{block.line} raised {e!r}"
                    ) from e
            for name, fn in list(namespace.items()):
                if name.startswith("test_") and callable(fn) and _takes_no_arguments(fn):
                    try:
                        fn()
                    except Exception as e:
                        raise AssertionError(f"{_id(path)}: {name}() raised {e!r}") from e
    finally:
        torch.random.set_rng_state(rng)


def _takes_no_arguments(fn) -> bool:
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def test_the_extractor_finds_blocks_and_honours_skip(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n\n```python skip\nraise SystemExit\n```\n"
        "````md\n```python\nnot python\n```\n````\n```bash\nls\n```\n"
    )
    found = blocks(page)
    assert [(b.info, b.runnable) for b in found] == [
        ("python", True),
        ("python skip", False),
        ("md", False),
        ("bash", False),
    ]
    assert found[0].code == "x = 1\n" and found[0].line == 2


def test_every_guide_and_the_readme_are_covered():
    names = {_id(p) for p in FILES}
    assert "README.md" in names
    assert any(n.startswith(os.path.join("docs", "guides")) for n in names)
