"""The CLI is an API: adding, renaming or removing a flag must be a deliberate act.

If this fails after an intended change, regenerate the snapshot:
    python tests/cli/test_cli_options.py > tests/cli/cli_options.txt
"""

import os
import re
import subprocess
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("cli_options.txt")


def current_options() -> list[str]:
    from miles_fsdp.cli import COMMANDS

    lines = []
    for name in COMMANDS:
        out = subprocess.run([sys.executable, "-m", "miles_fsdp.cli", name, "--help"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
        flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9.\-]*)", out.stdout)) - {"--help"})
        lines += [f"{name} {flag}" for flag in flags]
    return lines


def test_cli_options_match_snapshot():
    now = current_options()
    saved = SNAPSHOT.read_text().split("\n")
    saved = [line for line in saved if line]
    added, removed = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    assert not added and not removed, (
        f"CLI options changed: added {added[:20]}, removed {removed[:20]}. If intended, run "
        "`python tests/cli/test_cli_options.py > tests/cli/cli_options.txt` and commit it.")


if __name__ == "__main__":
    print("\n".join(current_options()))
