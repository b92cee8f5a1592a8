"""gradlab.testing works without hypothesis (only the strategies need it): the `bench` extra
has no hypothesis, and the `checking` benchmark suite imports check_gradients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Make `import hypothesis` fail in a fresh interpreter, as on a machine without it.
_BLOCK = "import sys; sys.modules['hypothesis'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + code], cwd=ROOT, capture_output=True, text=True
    )


def test_check_gradients_imports_and_runs_without_hypothesis() -> None:
    done = _run(
        "import torch\n"
        "from gradlab.testing import check_gradients, default_profile\n"
        "r = check_gradients(torch.tanh, torch.randn(5, dtype=torch.float64))\n"
        "print('ok', r.max_abs_error < 1e-6, default_profile() in ('gradlab-ci', 'gradlab-dev'))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "True", "True"]


def test_strategies_without_hypothesis_names_the_fix() -> None:
    done = _run("import gradlab.testing as t\nt.strategies\n")
    assert done.returncode != 0
    assert "gradlab.testing.strategies needs hypothesis" in done.stderr
    assert "pip install hypothesis" in done.stderr
