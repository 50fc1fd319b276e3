"""tests/gpu/test_on_policy_at_scale.py --points: each grid point's verdict from copied run directories
(the test's own asserts), so a run whose pytest the budget killed still tells which points passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests/gpu/test_on_policy_at_scale.py"


def _row(step: int, **over) -> dict:
    row = {"step": step, "train/loss": 0.1, "train/logprob_abs_diff_max": 0.0, "train/skipped_step": 0.0,
           "rollout/samples": 256, "engine/cuda_graphs_active": 1.0, "rollout/response_len_mean": 500.0,
           "engine/preemptions_total": 3, "train/grad_norm": 0.5}
    return {**row, **over}


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _points(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    return subprocess.run([sys.executable, str(SCRIPT), "--points", str(folder)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_points_report_each_failure_and_a_missing_point(tmp_path):
    good = [_row(s) for s in (1, 2, 3)]
    _write(tmp_path / "scale0", "dense_T0.6_k0_p1.0", good)
    _write(tmp_path / "scale0", "moe_T1.0_k20_p0.9", good[:2])  # killed after two steps
    _write(tmp_path / "scale0", "dense_T1.3_k20_p0.9", [*good[:2], _row(3, **{"train/logprob_abs_diff_max": 0.5})])
    _write(tmp_path / "scale0", "dense_T1.0_k0_p1.0", [_row(s, **{"train/grad_norm": "nan"}) for s in (1, 2, 3)])
    _write(tmp_path / "scale0", "moe_T0.6_k1_p1.0", [_row(s, **{"train/grad_norm": 0.0}) for s in (1, 2, 3)])
    (tmp_path / "scale0/dense_T0.6_k1_p0.9").mkdir()
    (tmp_path / "scale0/dense_T0.6_k1_p0.9/error.txt").write_text("Traceback: CUDA out of memory")
    proc = _points(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if "_T" in ln.split()[0]}
    assert len(lines) == 36
    assert lines["dense_T0.6_k0_p1.0"].endswith("passed")
    assert lines["moe_T0.6_k1_p1.0"].endswith("passed")  # top-k 1: identical samples, grad norm 0 expected
    assert "2 of 3 training steps logged" in lines["moe_T1.0_k20_p0.9"]
    assert "step 3: logprob_abs_diff_max 0.5" in lines["dense_T1.3_k20_p0.9"]
    assert "non-finite metrics {'train/grad_norm': 'nan'}" in lines["dense_T1.0_k0_p1.0"]
    assert "CUDA out of memory" in lines["dense_T0.6_k1_p0.9"]
    assert "no run directory" in lines["moe_T1.3_k0_p1.0"]
    assert proc.stdout.splitlines()[-1] == "2 of 36 points passed"


def test_points_pass_when_every_point_passes(tmp_path):
    for arch in ("moe", "dense"):
        for t in (0.6, 1.0, 1.3):
            for k in (0, 1, 20):
                for p in (1.0, 0.9):
                    _write(tmp_path, f"{arch}_T{t}_k{k}_p{p}", [_row(s) for s in (1, 2, 3)])
    proc = _points(tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "36 of 36 points passed", proc.stdout


def test_points_refuses_a_missing_folder(tmp_path):
    proc = _points(tmp_path / "nowhere")
    assert proc.returncode == 1 and "usage:" in proc.stderr
