"""Benchmarks: scripts that print tables (python -m tools.bench.X); docs quote them with the command that made them."""
