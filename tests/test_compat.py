"""The supported torch range (gradlab/_compat.py): an older torch is refused at import with a
message naming the minimum and what was found, and pyproject.toml declares the same minimum."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradlab._compat import TORCH_MINIMUM, _release, check_torch_version

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_minimum_that_gradlab_checks() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.findall(r'"torch>=([\d.]+)"', text)
    assert declared == [TORCH_MINIMUM], declared


@pytest.mark.skipif(
    os.environ.get("GRADLAB_ALLOW_ANY_TORCH") == "1",
    reason="GRADLAB_ALLOW_ANY_TORCH=1: a run on a torch outside the supported range",
)
def test_the_installed_torch_is_supported() -> None:
    check_torch_version()
    assert _release(str(torch.__version__)) >= _release(TORCH_MINIMUM)


@pytest.mark.parametrize(
    ("version", "release"),
    [("2.11.0", (2, 11)), ("2.11.0+cu130", (2, 11)), ("2.12.0a0+git1234abc", (2, 12)),
     ("2.9.1", (2, 9)), ("10.0.0.dev20300101", (10, 0))],
)  # fmt: skip
def test_release_reads_major_and_minor(version: str, release: tuple[int, int]) -> None:
    assert _release(version) == release


def _one_release_below(version: str) -> str:
    major, minor = _release(version)
    return f"{major}.{minor - 1}.0" if minor else f"{major - 1}.99.0"


@pytest.mark.parametrize("suffix", ["", "+cpu", "a0+git1234abc"])
def test_the_minimum_release_is_accepted_with_any_suffix(suffix: str) -> None:
    check_torch_version(f"{TORCH_MINIMUM}.0{suffix}")


def test_an_older_torch_is_refused_naming_both_versions() -> None:
    old = _one_release_below(TORCH_MINIMUM)
    expected = f"gradlab needs torch>={TORCH_MINIMUM}, but torch {old} is installed"
    with pytest.raises(ImportError, match=re.escape(expected)):
        check_torch_version(old)


def test_import_gradlab_with_an_older_torch_is_a_clear_import_error() -> None:
    # The torch found reports 2.1.2 (whose import of gradlab used to fail with an AttributeError
    # deep inside): `import gradlab` must stop first, with the minimum in the message.
    code = "import torch\ntorch.__version__ = '2.1.2'\nimport gradlab\n"
    env = {k: v for k, v in os.environ.items() if k != "GRADLAB_ALLOW_ANY_TORCH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ImportError: gradlab needs torch>={TORCH_MINIMUM}, but torch 2.1.2 is installed"
    ), done.stderr
    assert f"pip install 'torch>={TORCH_MINIMUM}'" in last
