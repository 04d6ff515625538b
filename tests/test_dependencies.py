"""The installed project is consistent: `pip check` finds nothing to report about this project or anything it
depends on, but the plugin dependencies of the GGUF package, which the README installs with --no-deps on purpose.
Packages outside that closure (a CI image's preinstalled tools) are not this project's to check."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.commands.import_gguf import SMOLLM2_PACKAGE

PROJECT, EXTRAS = "ttt-longctx", ("dev",)


def dependency_closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """The installed distributions `root[extras]` needs, itself included (canonical names)."""
    done: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(root), extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()  # "" for the distribution's own requirements, else one of its extras
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue  # pip check reports a missing one under its dependent's name
        for requirement in map(Requirement, lines):
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                needed = canonicalize_name(requirement.name)
                todo += [(needed, wanted) for wanted in ("", *requirement.extras)]
    return {name for name, _ in done}


def test_the_dependency_closure_follows_extras_and_markers():
    closure = dependency_closure(PROJECT, EXTRAS)
    assert {"torch", "transformers", "hydra-core", "pytest", "ruff", "huggingface-hub"} <= closure
    assert "ruff" not in dependency_closure(PROJECT, ())  # a dev extra


def test_pip_check_is_clean_for_the_project_but_for_the_gguf_packages_skipped_dependencies():
    ours = dependency_closure(PROJECT, EXTRAS) - {canonicalize_name(SMOLLM2_PACKAGE)}
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in result.stdout.splitlines() if line and canonicalize_name(line.split()[0]) in ours]
    assert not problems, result.stdout
