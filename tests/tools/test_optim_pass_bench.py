"""tools/bench/optim_pass.py under the Triton interpreter: the one-kernel AdamW pass against a
float64 AdamW (found_inf skips the step), and its GPU mode's code end to end on CPU tensors (a
small model), so the probe runs on the next GPU call as written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench" / "optim_pass.py"


def _run(*args):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)


def test_kernel_math_against_float64_adamw():
    proc = _run("--cpu-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "found_inf skipped the step: True" in proc.stdout


def test_gpu_mode_code_on_cpu(tmp_path):
    out = tmp_path / "optim.json"
    proc = _run("--device", "cpu", "--models", "small", "--reps", "1", "--warmup", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "small" and row["params"] > 0
    assert row["flat_shadow_is_p_in_bf16"] and row["table_shadow_is_p_in_bf16"]
    # torch's CPU AdamW vs the kernels, one step; the two kernels the same bits
    assert row["flat_step1_max_rel_diff"] < 1e-4
    assert row["flat_step1_elements_differ"] == row["table_step1_elements_differ"]
