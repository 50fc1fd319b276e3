"""tools/bench/engine_host.py runs on CPU and reports every phase (keeps the script from rotting)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_host_bench_writes_rows(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/engine_host.py"), "--batch", "4,8",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [4, 8]
    for r in rows:
        assert r["steps"] == 127  # 128 new tokens: the first comes from prefill
        parts = r["schedule_ms"] + r["fill_inputs_ms"] + r["sample_ms"] + r["postprocess_ms"]
        assert 0 < parts <= r["step_ms"]
    assert "step_ms" in proc.stdout
