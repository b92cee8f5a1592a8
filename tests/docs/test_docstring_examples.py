"""Every docstring example in gradlab runs when pasted after ``import gradlab as gl`` and
``import torch`` alone.

``pytest --doctest-modules`` runs the same examples with the defining module's globals in scope,
so an example that uses ``freeze`` or ``nn`` without importing them passes there and raises
``NameError`` for a user. Here each example runs in a fresh namespace holding only ``gl`` and
``torch`` (and the option flags of pyproject.toml).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

import gradlab


def _modules():
    names = ["gradlab"]
    for info in pkgutil.walk_packages(gradlab.__path__, "gradlab."):
        names.append(info.name)
    out = []
    for name in sorted(names):
        try:
            out.append(importlib.import_module(name))
        except ImportError:  # an optional dependency (hypothesis, matplotlib) is missing
            continue
    return out


def _examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    seen = set()
    tests = []
    for module in _modules():
        for test in finder.find(module, module.__name__, globs={}):
            if not test.examples or test.name in seen:
                continue
            seen.add(test.name)
            tests.append(test)
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = _examples()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_examples_were_found():
    names = {t.name for t in EXAMPLES}
    assert "gradlab.testing.strategies" in names
    assert any(n.endswith(".freeze") for n in names)
    assert len(EXAMPLES) > 30


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_example_runs_with_only_gl_and_torch(test):
    test.globs = {"gl": gradlab, "torch": torch, "__name__": "__main__"}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures: list[str] = []
    rng = torch.random.get_rng_state()
    torch.manual_seed(0)  # as the doctest seed fixture of the root conftest
    try:
        result = runner.run(test, out=failures.append)
    finally:
        torch.random.set_rng_state(rng)
        test.globs.clear()
    assert result.failed == 0, "".join(failures)


def _public_names():
    """(qualified name, object) for each function and class in a public package's __all__."""
    out = []
    for module in _modules():
        if any(p.startswith("_") for p in module.__name__.split(".")):
            continue
        if module.__name__ != "gradlab" and not hasattr(module, "__path__"):
            if module.__name__ != "gradlab.testing.strategies":
                continue
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                out.append((f"{module.__name__}.{name}", obj))
    return out


def test_every_public_function_and_class_has_an_example():
    # The object's own docstring: inspect.getdoc would let a subclass without one pass on its
    # base class's example.
    missing = sorted(name for name, obj in _public_names() if ">>>" not in (obj.__doc__ or ""))
    assert not missing, f"public names without a docstring example: {missing}"
