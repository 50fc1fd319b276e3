"""The README's first command, shortened: SFT then RL through the console script, on CPU."""

import json
import subprocess

from miles_fsdp.observe.metrics import read_metrics


def test_quickstart_short_runs_end_to_end_and_rl_improves(tmp_path):
    run = tmp_path / "qs"
    out = subprocess.run(["miles-fsdp", "quickstart", "--short", "--run-dir", str(run)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out accuracy after RL" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    for key in ("sft_accuracy", "rl_accuracy", "logprob_abs_diff_max", "wall_seconds"):
        assert key in summary
    assert summary["logprob_abs_diff_max"] == 0.0
    assert summary["rl_accuracy"] > summary["sft_accuracy"]  # held-out accuracy rises with RL
    rows = [r for r in read_metrics(run / "rl") if "rollout/reward_mean" in r]
    first, last = rows[: len(rows) // 3], rows[-(len(rows) // 3):]
    mean = lambda rs: sum(r["rollout/reward_mean"] for r in rs) / len(rs)  # noqa: E731
    assert mean(last) > mean(first)  # training reward rises
    assert all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    assert (run / "rl" / "hf" / "model.safetensors").is_file() and any((run / "rl" / "tb").iterdir())
