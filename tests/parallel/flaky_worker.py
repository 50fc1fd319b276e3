"""torchrun worker for test_torchrun_launch.py: `flaky_worker.py MARKER MODE`.

MODE abort: rank 0 aborts (SIGABRT) while MARKER does not exist, creating it first, so the first
launch dies of a signal and the second runs; MODE raise: rank 0 raises a Python error every time.
Every launch appends a line to MARKER.launches (rank 0).
"""

import os
import sys
from pathlib import Path

marker, mode = Path(sys.argv[1]), sys.argv[2]
if os.environ["RANK"] == "0":
    with open(f"{marker}.launches", "a") as f:
        f.write("launch\n")
    if mode == "raise":
        raise RuntimeError("a Python error in rank 0")
    if not marker.exists():
        marker.touch()
        print("rank 0 aborting", file=sys.stderr, flush=True)
        os.abort()
