"""tools/bench/train.py runs on CPU end to end with a MoE model and its peer (keeps the MoE
bench and its transformers peer config from rotting, as the newest transformers moves): the
MoE row's MFU is set against the dense model's, queued and waited-for steps each against the
peer run the same way."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_bench_moe_vs_dense_on_cpu(tmp_path):
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    cmd = [sys.executable, str(ROOT / "tools/bench/train.py"), "--model", "small", "small-moe", "--seqs", "64",
           "--modes", "invariant", "--steps", "2", "--warmup", "1", "--peer", "--peak-flops", "1e12",
           "--wait", "no", "yes", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["model"], r["mode"], r["wait"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(m, mode, w) for m in ("small", "small-moe") for mode in ("invariant", "peer")
                         for w in (False, True)}
    for w in (False, True):
        moe, dense = rows["small-moe", "invariant", w], rows["small", "invariant", w]
        peer = rows["small-moe", "peer", w]
        assert moe["tokens_per_s"] > 0 and peer["tokens_per_s"] > 0 and moe["mfu"] > 0
        assert moe["mfu_vs_dense"] == moe["mfu"] / dense["mfu"]
        assert moe["vs_peer"] == moe["tokens_per_s"] / peer["tokens_per_s"]
        assert abs(moe["step_s"] * moe["tokens_per_s"] - 64) < 1e-6  # a step is one 64-token sequence
    assert "MFU/dense" in proc.stdout


def test_train_bench_interleaves_modes_on_cpu(tmp_path):
    """--interleave: one trainer takes its steps in the two modes by turns; a row per mode, the
    second with its median speed ratio to the first, and the ratio line printed."""
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
    cmd = [sys.executable, str(ROOT / "tools/bench/train.py"), "--model", "small", "--seqs", "64",
           "--modes", "invariant", "fast", "--interleave", "--steps", "3", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["interleaved"]) for r in rows] == [("invariant", True), ("fast", True)]
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] > 0 and rows[1]["tokens_per_s"] > 0
    assert f"fast / invariant speed, median over 1 pairs of rounds (one each order): {rows[1]['vs_first']:.3f}x" \
        in proc.stdout


def test_interleaved_rounds_alternate_and_pairs_cancel_the_order(monkeypatch, bench_script):
    """--interleave reverses the modes' order every other round, and vs_first pairs the rounds so
    a cost of going second cancels: equal modes read 1.0 where the second step is 2% slower."""
    bench = bench_script("train")
    seen = []

    def steps(trainer, seqs, modes, wait):  # a step 2% slower when second in its round, fast 10% faster
        seen.append(list(modes))
        out = [{"time/train_step_s": (1.02 if i % 2 else 1.0) * (0.9 if m == "fast" else 1.0), "train/tokens": 64,
                "perf/peak_mem_gib": 0.0, "train/loss": 0.0} for i, m in enumerate(modes)]
        return out, 0.0

    monkeypatch.setattr(bench, "_trainer", lambda *a: (type("T", (), {"one_pass": True})(), [], "eager"))
    monkeypatch.setattr(bench, "_steps", steps)
    for n_steps in (4, 5):
        rows = bench.run_interleaved(64, ["invariant", "fast"], n_steps, 1, False, 1.0)
        assert seen[-1] == ["invariant", "fast", "fast", "invariant"] * 2 + ["invariant", "fast"] * (n_steps - 4)
        assert rows[0]["vs_first"] == 1.0 and abs(rows[1]["vs_first"] - 1 / 0.9) < 1e-12
