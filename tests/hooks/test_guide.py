"""docs/guides/diagnostics.md: its ```python blocks run top to bottom and print what they say."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "diagnostics.md"


def test_guide_code_runs() -> None:
    pytest.importorskip("matplotlib")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 5
    scope: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(GUIDE), "exec"), scope)
    lines = out.getvalue().splitlines()
    assert lines[0] == "['distance', 'gsnr', 'noise_scale', 'norm_test', 'update_size']"
    assert lines[1] == "True"
    assert lines[2] == "['0', '2']"
    alphas = eval(lines[3])  # three rounded alphas of the Adam run: finite numbers
    assert len(alphas) == 3 and all(math.isfinite(a) and a >= -1 for a in alphas)
    assert lines[4] == "nan"  # the last step has no step after it yet
    assert math.isfinite(float(lines[5]))
    assert lines[6] == "[True, True]"  # tic_trace of steps 0 and 2
    assert lines[7] == "[False, True, False, True]"
    assert lines[8] == "['0', '2']"
    assert lines[9] == "['diagnostics/gsnr', 'diagnostics/gsnr/0', 'diagnostics/gsnr/2']"
    assert lines[10] == "6 True"
    assert lines[11] == "5"
