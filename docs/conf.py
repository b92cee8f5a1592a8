"""Sphinx configuration for gradlab's documentation.

Build: ``bash docs/build.sh`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``).

Two things are generated at build time, so that nothing here needs a hand edit when the code grows:

* The API reference (``docs/api/*.rst``): one page per public package, found by walking
  :mod:`gradlab` (every ``gradlab.<name>`` without a leading underscore that has an ``__all__``,
  plus :mod:`gradlab.testing.strategies`), listing that package's ``__all__`` with autosummary.
  A new public name, or a new subpackage such as ``gradlab.per_sample``, gets its entry by being
  exported. Names that :mod:`gradlab` re-exports from a subpackage are documented once, in the
  subpackage; references to ``gradlab.<name>`` are redirected there.
* The intersphinx inventories (``docs/_build/inventories/*.inv``) of torch, Python, NumPy and
  SciPy, written from the small text lists in ``docs/_inventories/`` (this machine has no
  internet, so the projects' own ``objects.inv`` cannot be downloaded). The links point at the
  real online documentation. A reference to a name that is not in a list fails the build: add
  the line (``name role path``) to the list.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import gradlab  # noqa: E402

project = "gradlab"
author = "gradlab contributors"
copyright = "2026, gradlab contributors"
release = gradlab.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_inventories", "_templates"]
templates_path = ["_templates"]

# Every reference must resolve (with -W a broken one fails the build).
nitpicky = True
nitpick_ignore_regex = [
    # Private helpers that public signatures mention (type aliases, internal classes).
    ("py:.*", r"gradlab\.(.*\.)?_.*"),
    # Type variables and typing internals that have no page anywhere.
    ("py:.*", r"(typing\.)?(T|K|V|P|R|_\w+)"),
    # Private type aliases of gradlab's modules, shown by their short name in signatures.
    ("py:class", r"FreezeTarget|Kind|TensorFn|TensorOrTensors"),
]

# Short spellings that gradlab's string annotations use (``nn.Module`` with ``from torch import
# nn``), resolved through the inventories as their full names.
SHORT_NAMES = {
    "nn.Module": "torch.nn.Module",
    "nn.Parameter": "torch.nn.Parameter",
    "Optimizer": "torch.optim.Optimizer",
    "Figure": "matplotlib.figure.Figure",
    "'torch.nn.Module'": "torch.nn.Module",
}

# -- autodoc / autosummary / napoleon ---------------------------------------------------------
autosummary_generate = True
# The one-line summaries of the API tables end at the first sentence; "w.r.t." and "e.g." do not
# end one (autosummary's own rule would cut "Capture gradients w.r.t." there).
import sphinx.ext.autosummary as _autosummary  # noqa: E402

_autosummary.periods_re = re.compile(r"(?<!w\.r\.t)(?<!e\.g)(?<!i\.e)\.(?:\s+)")
autosummary_imported_members = True
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
add_module_names = False
python_use_unqualified_type_names = True

# -- MyST ----------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# -- HTML ------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"gradlab {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}

# -- intersphinx from local inventories ---------------------------------------------------------
_INVENTORIES = {
    # name: (online documentation root, base of the entries' paths)
    "torch": "https://docs.pytorch.org/docs/stable/",
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "scipy": "https://docs.scipy.org/doc/scipy/",
    "matplotlib": "https://matplotlib.org/stable/",
    "hypothesis": "https://hypothesis.readthedocs.io/en/latest/",
}


def _write_inventory(name: str, src: Path, dst: Path) -> None:
    """Write a Sphinx v2 ``objects.inv`` from ``src``: lines ``name role path`` (``#`` comments).

    ``role`` is ``py:function``, ``py:class``, ... (``std:doc`` for pages); ``path`` is relative
    to the project's online root, ``$`` standing for the name (Sphinx's own abbreviation).
    """
    lines = []
    for raw in src.read_text().splitlines():
        raw = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not raw:
            continue
        obj, role, path = raw.split()
        lines.append(f"{obj} {role} 1 {path.replace('$', obj)} -\n")
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {name}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    dst.write_bytes(header.encode() + zlib.compress("".join(lines).encode()))


_inv_dir = HERE / "_build" / "inventories"
_inv_dir.mkdir(parents=True, exist_ok=True)
intersphinx_mapping = {}
for _name, _url in _INVENTORIES.items():
    _src = HERE / "_inventories" / f"{_name}.txt"
    _dst = _inv_dir / f"{_name}.inv"
    _write_inventory(_name, _src, _dst)
    intersphinx_mapping[_name] = (_url, str(_dst))
intersphinx_timeout = 1


# -- the API reference, generated from __all__ --------------------------------------------------
def public_packages() -> list[str]:
    """gradlab, every public subpackage with an ``__all__``, and the public modules a package
    exports by name (``gradlab.testing.strategies``). New subpackages are picked up; a module
    whose import fails for a missing optional dependency is left out."""
    names = ["gradlab"]
    for info in pkgutil.walk_packages(gradlab.__path__, "gradlab."):
        if not info.ispkg or any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        if hasattr(module, "__all__"):
            names.append(info.name)
    for pkg in list(names):
        module = sys.modules[pkg]
        for name in module.__all__:
            try:
                obj = getattr(module, name)
            except ImportError:
                continue
            if inspect.ismodule(obj) and hasattr(obj, "__all__") and obj.__name__ not in names:
                names.append(obj.__name__)
    return names


def _home(obj: object, name: str, owner: str, packages: list[str]) -> str:
    """The package that documents ``obj``: the shortest-named subpackage exporting it, else
    ``owner`` (so ``gl.hessian_trace`` is documented in :mod:`gradlab.curvature`)."""
    homes = [
        pkg
        for pkg in packages
        if pkg != "gradlab"
        and name in getattr(sys.modules[pkg], "__all__", ())
        and getattr(sys.modules[pkg], name, None) is obj
    ]
    return min(homes, key=len) if homes else owner


REEXPORTS: dict[str, str] = {}  # "gradlab.hessian_trace" -> "gradlab.curvature.hessian_trace"


def _data_doc(pkg: str, name: str, obj: object) -> list[str]:
    """The ``#:`` comment documenting module-level data ``name`` (a registry, a tuple of names),
    looked up in ``pkg`` and its private modules; the object's own type docstring (``dict``'s)
    would say nothing about it."""
    from sphinx.pycode import ModuleAnalyzer

    for modname, module in sorted(sys.modules.items()):
        if module is None or not (modname == pkg or modname.startswith(pkg + ".")):
            continue
        if getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:
            continue
        lines = docs.get(("", name))
        if lines:
            return [line for line in lines if line.strip()]
    return [f"A ``{type(obj).__name__}``; see the module description above."]


def write_api_pages() -> None:
    api = HERE / "api"
    api.mkdir(exist_ok=True)
    packages = public_packages()
    titles = []
    for pkg in packages:
        module = sys.modules[pkg]
        own, reexported, submodules, data = [], [], [], []
        for name in sorted(module.__all__, key=lambda s: (s.lower(), s)):
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                submodules.append(obj.__name__)
                continue
            if not (inspect.isclass(obj) or callable(obj)):
                data.append((name, obj))
                continue
            home = _home(obj, name, pkg, packages)
            if home != pkg:
                reexported.append((name, home))
                REEXPORTS[f"{pkg}.{name}"] = f"{home}.{name}"
            else:
                own.append(name)
        title = pkg
        text = [
            title,
            "=" * len(title),
            "",
            f".. automodule:: {pkg}",
            "   :no-members:",
            "",
            f".. currentmodule:: {pkg}",
            "",
        ]
        if own:
            text += [
                "Functions and classes",
                "---------------------",
                "",
                ".. autosummary::",
                "   :toctree: generated",
                "   :nosignatures:",
                "",
                *[f"   {name}" for name in own],
                "",
            ]
        if data:
            text += ["Data", "----", ""]
        for name, obj in data:
            text += [f".. py:data:: {name}", f"   :type: {type(obj).__name__}", ""]
            text += [f"   {line}" for line in _data_doc(pkg, name, obj)] + [""]
        if reexported:
            text += [
                "Also exported here",
                "------------------",
                "",
                f"These names are documented in their subpackage and importable from ``{pkg}``:",
                "",
            ]
            for name, home in reexported:
                text.append(f"* :obj:`{pkg}.{name} <{home}.{name}>` (:mod:`{home}`)")
            text.append("")
        if submodules:
            text += ["Submodules: " + ", ".join(f":mod:`{m}`" for m in submodules), ""]
        page = pkg.replace(".", "_")
        (api / f"{page}.rst").write_text("\n".join(text))
        titles.append(page)
    index = [
        "API reference",
        "=============",
        "",
        "Generated from each public package's ``__all__``. Everything the top-level package",
        "re-exports (``gl.hessian_trace``, ``gl.freeze``, ...) is documented once, in its",
        "subpackage.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
        *[f"   {t}" for t in titles],
        "",
    ]
    (api / "index.rst").write_text("\n".join(index))


write_api_pages()


def _redirect_reexports(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Resolve ``gradlab.hessian_trace`` to ``gradlab.curvature.hessian_trace`` (documented once),
    and the short spellings of :data:`SHORT_NAMES` through intersphinx."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if target in SHORT_NAMES:
        from sphinx.ext import intersphinx

        alias = node.deepcopy()
        alias["reftarget"] = SHORT_NAMES[target]
        return intersphinx.missing_reference(app, env, alias, contnode)
    candidates = [target]
    if node.get("py:module") and not target.startswith("gradlab"):
        candidates.append(f"{node['py:module']}.{target}")
    for cand in candidates:
        head = cand
        for exported, home in REEXPORTS.items():
            if head == exported or head.startswith(exported + "."):
                new = home + head[len(exported) :]
                domain = env.get_domain("py")
                return domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], new, node, contnode
                )
    return None


def _append_new_guides(app, docname, source):  # type: ignore[no-untyped-def]
    """Add every page of docs/guides/ that guides/index.md does not list to its toctree."""
    if docname != "guides/index":
        return
    text = source[0]
    listed = set(text.split())
    extra = sorted(
        p.stem for p in (HERE / "guides").glob("*.md") if p.stem != "index" and p.stem not in listed
    )
    if extra:
        start = text.index("```{toctree}")
        end = text.index("\n```", start)
        source[0] = text[:end] + "".join(f"\n{name}" for name in extra) + text[end:]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):  # type: ignore[no-untyped-def]
    """Leave out the members autodoc lists for a NamedTuple's fields, whose only text is Python's
    "Alias for field number N": the class docstring describes its fields (and the signature line
    names them)."""
    if what == "class" and re.fullmatch(r"Alias for field number \d+", (obj.__doc__ or "").strip()):
        return True
    return None


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("missing-reference", _redirect_reexports, priority=400)
    app.connect("source-read", _append_new_guides)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)


os.environ.setdefault("GRADLAB_AUTOTUNE", "0")
