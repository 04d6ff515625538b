"""User utilities: benchmarks, data preparation, export, evaluation, memory planning."""
