"""tools/bench/attn_swapped.py, the swapped-operand decode candidate the GPU sweep times
(`attn_sweep.py --swapped`): its values vs float64 under the Triton interpreter, so the
candidate that gets measured computes attention (several splits, a short last block, GQA)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_swapped_decode_candidate_is_attention():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/attn_swapped.py")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "swapped_decode: ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
