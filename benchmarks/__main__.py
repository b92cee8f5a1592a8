"""``python -m benchmarks``: see ``python -m benchmarks --help``. Run from the repository root."""

import sys
from pathlib import Path

from benchmarks._cli import ROOT, RUN_FROM_ROOT, main

if Path.cwd().resolve() != ROOT:
    print(f"python -m benchmarks: the current folder is {Path.cwd()}, not {ROOT}. {RUN_FROM_ROOT}")
    sys.exit(2)
sys.exit(main())
