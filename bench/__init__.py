"""Benchmarks, run from the repository root as ``python -m bench.<bench>`` (results in docs/BENCHMARKS.md)."""
