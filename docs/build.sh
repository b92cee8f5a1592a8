#!/usr/bin/env bash
# Build the documentation as CI does: warnings are errors, so every public name must be documented
# and every cross-reference must resolve. Needs `pip install -e ".[docs]"`. Output: docs/_build/html.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf docs/_build/html docs/api
exec sphinx-build -W --keep-going -b html docs docs/_build/html "$@"
