"""Benchmarks for ViLex (installed as `vilex.benchmarks`; `vilex bench` runs them)."""
