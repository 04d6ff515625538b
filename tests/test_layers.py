"""Imports point down only (tools -> trainer -> parallel, hydra_plugins -> trainer) and run in no circle: the
import-linter contracts of pyproject.toml hold, and they do fail on an upward import (checked on a scratch tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tools", "trainer", "parallel", "hydra_plugins.ttt_search")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([lint, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def test_no_module_imports_one_that_imports_it_back():
    """Late imports inside functions included (grimp reads every import statement)."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    circles = sorted(
        {tuple(sorted((module, imported)))
         for module in graph.modules for imported in graph.find_modules_directly_imported_by(module)
         if graph.find_shortest_chain(importer=imported, imported=module)}
    )  # fmt: skip
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(
    "upward",
    ["trainer/loop.py: from tools.cli import positive_int", "parallel/mesh.py: import trainer.config"],
)
def test_an_upward_import_breaks_the_contract(tmp_path, upward):
    """The same contracts on a scratch tree of empty modules shaped like the project's, one upward import added."""
    for module in ("tools/cli.py", "trainer/loop.py", "trainer/config.py", "parallel/mesh.py",
                   "hydra_plugins/ttt_search/optuna_sweeper.py"):  # fmt: skip
        path = tmp_path / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        for package in path.relative_to(tmp_path).parents:
            if package.name and package.name != "hydra_plugins":  # hydra_plugins is a namespace package
                (tmp_path / package / "__init__.py").touch()
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path).returncode == 0  # the scratch tree alone keeps them
    module, statement = upward.split(": ")
    (tmp_path / module).write_text(statement + "\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
