"""Benchmarks for xkernels and xmodel: pytest-benchmark modules (``bench_*.py``), the ceilings they are
measured against (:mod:`benchmarks.ceilings`), the shared harness (:mod:`benchmarks.common`) and the one-command
GPU report (``python -m benchmarks.report``).  See ``benchmarks/README.md``."""
