"""tools/bench/rl_step.py runs on CPU end to end (keeps the script from rotting): generate,
reward, train, weight sync, with the on-policy diff and the engine's metrics in the JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rl_step_bench_tiny_writes_steps(tmp_path):
    out = tmp_path / "rl_step.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    cmd = [sys.executable, str(ROOT / "tools/bench/rl_step.py"), "--tiny", "--prompts", "2", "--n", "2",
           "--prompt-len", "8", "--new", "8", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [s["step"] for s in res["steps"]] == [0, 1]
    for s in res["steps"]:
        assert s["logprob_abs_diff_max"] == 0.0 and s["gen_tokens"] == 2 * 2 * 8
        assert s["engine/preemptions_total"] == 0.0
    assert "preemptions in 2 steps" in proc.stdout
