"""``python -m benchmarks``: see ``python -m benchmarks --help``."""

import sys

from benchmarks._cli import main

sys.exit(main())
