import subprocess
import sys
from pathlib import Path

import pytest

# helpers that several test directories share (server_thread.py, torchrun.py) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))

QUICKSTART_TIMEOUT_S = 540
"""Under a test's pytest timeout (600 s), leaving time to kill the run and report."""


@pytest.fixture(scope="session")
def quickstart_short(tmp_path_factory) -> tuple[Path, str]:
    """`miles-fsdp quickstart --short --run-dir RUN` run once for the session (tests/quickstart checks
    the run, tests/cli runs the README's commands on its outputs): (RUN, its stdout). Tests that
    write may only add paths of their own under RUN. ~45 s on an idle 2-core machine, ~110 s with a
    busy-loop process beside it."""
    work = tmp_path_factory.mktemp("quickstart")
    run = work / "qs"
    cmd = ["miles-fsdp", "quickstart", "--short", "--run-dir", str(run)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUICKSTART_TIMEOUT_S, cwd=work)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"quickstart --short took over {QUICKSTART_TIMEOUT_S} s; its log ends:\n"
                    f"{_tail(e.stdout)}{_tail(e.stderr)}")
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return run, out.stdout


def _tail(text: str | bytes | None, n: int = 3000) -> str:
    if isinstance(text, bytes):  # TimeoutExpired keeps bytes even for text=True runs
        text = text.decode(errors="replace")
    return (text or "")[-n:]
