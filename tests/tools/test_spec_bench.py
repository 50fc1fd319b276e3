"""tools/bench/spec.py runs on CPU end to end (keeps the script from rotting): pretrain, RL
with the online draft, measurements with no, frozen and online draft, outputs identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_spec_bench_tiny_writes_rows(tmp_path):
    out = tmp_path / "spec.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/spec.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["rl_step"], r["batch"]) for r in res["rows"]] == [(0, 1), (0, 16), (2, 1), (2, 16)]
    for r in res["rows"]:
        assert r["accept_len_online"] > 1.5 and len(r["accept_by_pos_online"]) == 3  # the pretrained draft drafts
    assert [s["logprob_abs_diff_max"] for s in res["rl"]] == [0.0, 0.0]
    assert "speedup over no speculation" in proc.stdout
