"""Launch a test's multi-process run under torchrun (gloo, CPU) and fail with every rank's own log.

torchrun's console interleaves the ranks, and a rank that aborts first (SIGABRT, say) is named
only as "the root cause" while its message scrolls out of a tail. Here each rank writes its own
stdout/stderr under a log directory, and a failure shows the end of each, rank by rank.

A launch whose first failing rank was killed by a signal (a gloo rank on CPU has died of SIGABRT
mid-run with no Python error, once in CI) runs once more; the first attempt's logs go out as a
warning, so the crash is still reported. A rank that fails with a Python error or a nonzero exit
is never retried.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

TAIL = 4000  # characters of each rank's log in a failure message


def torchrun(args: list, nproc: int = 2, timeout: int = 300, retry: bool = True,
             before_retry: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node nproc *args`; asserts it exits 0.
    retry: a launch whose rank was killed by a signal runs once more (module docstring), after
    `before_retry` (which clears what the first attempt left, a run directory say)."""
    proc, report = _launch(args, nproc, timeout)
    signal = _root_cause_signal(proc.stderr) if proc.returncode and retry else None
    if signal is not None:
        warnings.warn(f"a rank was killed by signal {signal}; launching once more. The first attempt:\n{report}")
        if before_retry is not None:
            before_retry()
        proc, report = _launch(args, nproc, timeout)
    assert proc.returncode == 0, report
    return proc


def _root_cause_signal(stderr: str) -> int | None:
    """The signal that killed the first failing rank, from torchrun's "Root Cause" block; None
    when that rank exited with a code (a Python error, say)."""
    m = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.S)
    return -int(m.group(1)) if m and int(m.group(1)) < 0 else None


def _launch(args: list, nproc: int, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    """One launch: (the process, a report of every rank's log and torchrun's, "" on success)."""
    with tempfile.TemporaryDirectory(prefix="torchrun_logs_") as log_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--log-dir", log_dir, "--redirects", "3", *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's stack
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not finish in {timeout} s\n{rank_logs(log_dir)}") from None
        if proc.returncode == 0:
            return proc, ""
        return proc, f"torchrun exited {proc.returncode}\n{rank_logs(log_dir)}\n--- torchrun ---\n{proc.stderr[-TAIL:]}"


def rank_logs(log_dir: Path) -> str:
    """The end of each rank's stdout and stderr, in rank order."""
    parts = []
    for f in sorted(Path(log_dir).rglob("*.log"), key=lambda p: (p.parent.name, p.name)):
        text = f.read_text(errors="replace")
        if text.strip():
            parts.append(f"--- rank {f.parent.name} {f.name} ---\n{text[-TAIL:]}")
    return "\n".join(parts) or f"(no rank logs under {log_dir})"
