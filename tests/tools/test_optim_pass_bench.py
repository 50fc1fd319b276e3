"""tools/bench/optim_pass.py's GPU mode end to end on CPU tensors under the Triton interpreter
(a small model), so the bench runs on a GPU as written: torch's passes, the one pass as the
trainer calls it and the flat floor, each first step compared with torch's (CPU AdamW here:
within fp32 rounding; the GPU compares with the fused kernel, tests/gpu/test_optim_gpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench" / "optim_pass.py"


def test_gpu_mode_code_on_cpu(tmp_path):
    out = tmp_path / "optim.json"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--models", "tiny", "--reps", "1",
                           "--warmup", "0", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "tiny" and row["params"] > 0 and row["one_pass_shadow_is_p_in_bf16"]
    assert row["one_pass_step1_max_rel_diff"] < 1e-4 and row["flat_step1_max_rel_diff"] < 1e-4
    # the table of tensors and the flat buffer: the same kernel math, the same bits
    assert row["one_pass_step1_elements_differ"] == row["flat_step1_elements_differ"]
    assert all(row[f"{k}_ms"] > 0 for k in ("before", "one_pass", "flat"))
