"""Extract the ```python blocks of a Markdown file (README.md, docs/**/*.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fence: three or more backticks (or tildes), an info string, the body, the same fence closing.
_FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def runnable(self) -> bool:
        """A ```python block runs unless its info string says ``skip`` (```python skip)."""
        words = self.info.split()
        return bool(words) and words[0] in ("python", "py") and "skip" not in words[1:]


def markdown_files() -> list[Path]:
    """README.md and every page of docs/ (generated output excluded)."""
    docs = ROOT / "docs"
    pages = sorted(
        p
        for p in docs.rglob("*.md")
        if not any(part in ("_build", "api") for part in p.relative_to(docs).parts)
    )
    return [ROOT / "README.md", *pages]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(path, line, m.group("info").strip(), m.group("body")))
    return out
