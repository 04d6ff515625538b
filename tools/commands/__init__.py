"""The user commands behind the ttt-* console scripts (pyproject.toml [project.scripts])."""
