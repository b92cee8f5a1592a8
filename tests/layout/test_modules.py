"""Every subpackage of gradlab is reachable as a module: no attribute of ``gradlab`` shadows one."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import gradlab


def _subpackages() -> list[str]:
    return [
        info.name
        for info in pkgutil.iter_modules(gradlab.__path__)
        if not info.name.startswith("_")
    ]


def test_the_public_subpackages_are_the_expected_ones():
    assert set(_subpackages()) >= {"curvature", "finetune", "hooks", "penalties", "testing"}


def test_no_subpackage_is_shadowed_by_a_function():
    for name in _subpackages():
        module = importlib.import_module(f"gradlab.{name}")
        assert isinstance(module, types.ModuleType), name
        assert getattr(gradlab, name, module) is module, (
            f"gradlab.{name} is {getattr(gradlab, name)!r}, not the module"
        )


def test_finetune_is_a_module_and_freeze_stays_the_function():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gradlab.finetune as m, gradlab as gl; "
            "print(type(m).__name__, m.FrozenBatchNorm2d.__name__, callable(gl.freeze), "
            "gl.freeze is m.freeze)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["module", "FrozenBatchNorm2d", "True", "True"]
