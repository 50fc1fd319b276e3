"""Triton kernels under the Triton interpreter (CPU, fp32, tiny shapes).

TRITON_INTERPRET=1 must be set before triton is first imported, so the checks run in one
child process (this file run as a script); each pytest test asserts on its check's result.
Every check compares with a float64 torch reference and asserts the invariance property
bitwise (row alone == row in batch; prefill == chunked prefill == decode).
"""

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_triton_checks as checks_mod  # noqa: E402  (sibling module: torch only, no triton)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and out.exists(), f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(checks_mod.CHECKS))
def test_triton_interp(results, name):
    assert results[name] == "ok", results[name]


def _main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    res = {}
    for name, fn in checks_mod.CHECKS.items():
        try:
            fn()
            res[name] = "ok"
        except Exception:  # record every failure; the parent test names the check
            res[name] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    _main(sys.argv[1])
