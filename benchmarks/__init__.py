"""Benchmarks and the trained reference model for bd_compile (not part of the installed package)."""
