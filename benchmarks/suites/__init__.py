"""Benchmark suites: each module defines ``SUITE = benchmarks._core.Suite(...)``."""
