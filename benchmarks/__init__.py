"""gradlab's benchmark suites (a repository folder, not installed). Run ``python -m benchmarks``."""
