"""The gradlab pytest plugin (gradlab/testing/_plugin.py) in a throwaway project outside the
repository: the hypothesis recipe of docs/guides/gradient_checking.md, copied into a temporary
directory, must pass with plain ``pytest``, with ``--hypothesis-profile=gradlab-ci`` and with
``GRADLAB_HYPOTHESIS_PROFILE``; the ``device`` fixture must exist there.

The plugin is found through its ``pytest11`` entry point exactly as ``pyproject.toml`` declares
it: the test writes that entry point into a stand-in distribution on ``PYTHONPATH`` (this
checkout's gradlab may not be the installed one), so pytest's own entry-point loading is what
runs. One run uses ``-p gradlab.testing._plugin`` instead, the route without installation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROFILE_TEST = """
import os
from hypothesis import settings


def test_profile_is_the_expected_one():
    expected = settings.get_profile(os.environ["EXPECTED_PROFILE"])
    assert settings.default.max_examples == expected.max_examples
    assert settings.default.derandomize == expected.derandomize
    assert settings.default.deadline is None
"""


def _recipe() -> str:
    guide = (ROOT / "docs" / "guides" / "gradient_checking.md").read_text()
    section = guide.split("## A test file that runs as it is", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _project(tmp_path: Path) -> tuple[Path, Path]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_my_activation.py").write_text(_recipe())
    (project / "test_profile.py").write_text(_PROFILE_TEST)
    return project, _entry_point_site(tmp_path)


def _entry_point_site(tmp_path: Path) -> Path:
    """A stand-in distribution declaring pyproject.toml's pytest11 entry points."""
    site = tmp_path / "site"
    dist = site / "gradlab_plugin_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gradlab-plugin-probe\nVersion: 0.0\n"
    )
    # The [project.entry-points.pytest11] table of pyproject.toml (no tomllib on Python 3.10).
    table = (ROOT / "pyproject.toml").read_text().split("[project.entry-points.pytest11]\n", 1)[1]
    lines = re.findall(r'^"?([\w.]+)"? = "([\w.]+)"$', table.split("\n[", 1)[0], re.M)
    assert lines, "no pytest11 entry point in pyproject.toml"
    text = "".join(f"{name} = {target}\n" for name, target in lines)
    (dist / "entry_points.txt").write_text("[pytest11]\n" + text)
    return site


def _pytest(project: Path, pythonpath: list[Path], *args: str, **env: str):
    return _run(project, pythonpath, ["-m", "pytest", *_OPTIONS, *args], **env)


_OPTIONS = ("-q", "-rs", "-p", "no:cacheprovider")


def _run(project: Path, pythonpath: list[Path], argv: list[str], **env: str):
    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "CI",
            "GRADLAB_HYPOTHESIS_PROFILE",
            "PYTEST_ADDOPTS",
            "PYTEST_PLUGINS",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
            "GRADLAB_ALLOW_ANY_TORCH",  # scripts/compat sets it; it would skip the check tested
        )
    }
    clean["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    clean.update(env)
    return subprocess.run(
        [sys.executable, *argv],
        cwd=project,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _counts(out: str) -> tuple[int, int, int]:
    tail = out.strip().splitlines()[-1]
    get = lambda word: int(m.group(1)) if (m := re.search(rf"(\d+) {word}", tail)) else 0
    return get("passed"), get("skipped"), get("failed") + get("error")


def test_readme_recipe_with_plain_pytest(tmp_path: Path) -> None:
    project, site = _project(tmp_path)
    done = _pytest(project, [site, ROOT], EXPECTED_PROFILE="gradlab-dev")
    assert done.returncode == 0, done.stdout + done.stderr
    passed, skipped, failed = _counts(done.stdout)
    # recipe: the property test + device[cpu] (device[cuda] skipped without a GPU); profile test
    assert failed == 0 and passed + skipped == 4 and passed >= 3
    if skipped:
        assert "CUDA is not available" in done.stdout


def test_readme_recipe_with_the_ci_profile_option(tmp_path: Path) -> None:
    # Also names the plugin with -p although the entry point loads it: harmless, since the entry
    # point is named after the module (no "Plugin already registered" error).
    project, site = _project(tmp_path)
    done = _pytest(
        project,
        [site, ROOT],
        "-p",
        "gradlab.testing._plugin",
        "--hypothesis-profile=gradlab-ci",
        EXPECTED_PROFILE="gradlab-ci",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(done.stdout)[2] == 0


def test_profile_from_the_environment_without_installation(tmp_path: Path) -> None:
    # No entry point on the path: the plugin named with -p, the profile by the variable.
    project, _ = _project(tmp_path)
    env = {"GRADLAB_HYPOTHESIS_PROFILE": "gradlab-ci", "EXPECTED_PROFILE": "gradlab-ci"}
    done = _pytest(project, [ROOT], "-p", "gradlab.testing._plugin", "test_profile.py", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(done.stdout) == (1, 0, 0)


def test_unknown_profile_in_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    project, site = _project(tmp_path)
    done = _pytest(project, [site, ROOT], "test_profile.py", GRADLAB_HYPOTHESIS_PROFILE="nope")
    assert done.returncode == 4  # pytest's usage error
    assert "GRADLAB_HYPOTHESIS_PROFILE='nope' is not a registered hypothesis profile" in (
        done.stderr + done.stdout
    )


# A user's project that does not use gradlab, run by a driver that makes `import gradlab` fail
# before pytest starts (nothing is installed or uninstalled): the gradlab plugin, loaded through
# its entry point as pytest does in any environment where gradlab is installed, must warn, name
# the cause and provide nothing, and the user's tests must run.
_UNRELATED_TESTS = """
import pytest


def test_arithmetic():
    assert 1 + 1 == 2


def test_the_plugin_provides_nothing(request):
    with pytest.raises(pytest.FixtureLookupError):
        request.getfixturevalue("device")
"""

_BREAK_IMPORT = {
    # One gradlab module cannot be imported, as in a broken installation (None in sys.modules
    # halts its import; a meta-path finder would be bypassed by pytest's assertion rewriter).
    "module": """
sys.modules["gradlab._derivatives"] = None
""",
    # The torch found reports a release older than gradlab supports.
    "old torch": """
import torch

torch.__version__ = "2.1.2"
""",
}
_CAUSE = {
    "module": "ModuleNotFoundError: import of gradlab._derivatives halted; None in sys.modules",
    "old torch": "ImportError: gradlab needs torch>=",
}


def _driver(tmp_path: Path, how: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_unrelated.py").write_text(_UNRELATED_TESTS)
    script = tmp_path / "driver.py"
    script.write_text(
        "import sys\n" + _BREAK_IMPORT[how] + "\nimport pytest\n\nsys.exit(pytest.main())\n"
    )
    return script


@pytest.mark.parametrize("how", sorted(_BREAK_IMPORT))
def test_plugin_warns_and_does_nothing_when_gradlab_cannot_be_imported(
    tmp_path: Path, how: str
) -> None:
    script = _driver(tmp_path, how)
    done = _run(tmp_path / "project", [_entry_point_site(tmp_path), ROOT], [str(script), *_OPTIONS])
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert _counts(done.stdout) == (2, 0, 0)
    assert "GradlabPluginWarning: gradlab's pytest plugin is disabled for this run" in out
    assert _CAUSE[how] in out
    if how == "old torch":
        assert "but torch 2.1.2 is installed" in out


def test_plugin_failure_is_not_an_error_where_warnings_are_errors(tmp_path: Path) -> None:
    # filterwarnings = error (common in projects) must not turn a broken gradlab into a failed
    # start: the warning then goes to stderr.
    script = _driver(tmp_path, "module")
    site = _entry_point_site(tmp_path)
    done = _run(tmp_path / "project", [site, ROOT], [str(script), *_OPTIONS, "-W", "error"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(done.stdout) == (2, 0, 0)
    assert _CAUSE["module"] in done.stderr
