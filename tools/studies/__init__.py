"""Research studies: each trains and scores runs side by side and writes its tables (python -m tools.studies.X)."""
