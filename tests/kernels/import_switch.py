"""An environment switch read when miles_kernels is imported (MILES_ATTN_BWD, MILES_MOE_BWD):
a bogus value fails the import with a message naming it and a valid value; `good` runs `code`."""

import os
import subprocess
import sys


def check_import_switch(var: str, code: str, good: str, named: str) -> None:
    for value, ok in (("bogus", False), (good, True)):
        env = dict(os.environ, **{var: value})
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
        if not ok:
            assert f"{var}='bogus'" in proc.stderr and named in proc.stderr, proc.stderr[-2000:]
