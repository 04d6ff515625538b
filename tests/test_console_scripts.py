"""Every user command is a console script of the installed package, and each answers --help with exit code 0."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

COMMANDS = {
    "ttt-train", "ttt-eval", "ttt-export", "ttt-import-gguf", "ttt-prepare-data", "ttt-plan", "ttt-gpu-check",
    "ttt-stdlib-corpus", "ttt-train-tokenizer",
}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
    found = metadata.distribution("ttt-longctx").entry_points
    return {entry.name: entry.value for entry in found if entry.group == "console_scripts"}


def test_every_user_command_is_installed_and_every_module_in_tools_commands_has_one():
    scripts = _scripts()
    assert set(scripts) == COMMANDS
    modules = {value.split(":")[0] for value in scripts.values()}
    commands = {f"tools.commands.{p.stem}" for p in (REPO / "tools" / "commands").glob("*.py")}
    helpers = {"tools.commands.__init__", "tools.commands.eval_inputs"}  # what the commands share
    assert commands - helpers <= modules, commands - helpers - modules


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_answers_help(command):
    executable = shutil.which(command, path=str(Path(sys.executable).parent)) or shutil.which(command)
    assert executable, f"{command} is not on the PATH: pip install -e ."
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert command.removeprefix("ttt-") in result.stdout.lower()
