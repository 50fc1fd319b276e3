import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plot_run():
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "tools" / "plot_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_present_metrics_and_notes_missing(tmp_path):
    pr = _plot_run()
    rows = [
        {"step": s, "rollout/reward_mean": 0.1 * s, "rollout/response_len_mean": 4 + s,
         "train/logprob_abs_diff_max": 0.0, "time/rollout_s": 1.0, "time/train_s": 2.0,
         "train/loss": "nan" if s == 2 else 1.0 / (s + 1)}
        for s in range(5)
    ]
    rows[4]["eval/accuracy"] = 0.5
    _write(tmp_path, rows)
    out, notes = pr.plot_run(tmp_path)
    assert out == tmp_path / "plots.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert notes == []
    assert pr.series(rows, "train/loss")[0] == [0, 1, 3, 4]  # "nan" left out
    assert pr.panel_metrics(rows, ["time/*"]) == ["time/rollout_s", "time/train_s"]


def test_missing_panels_are_noted(tmp_path):
    pr = _plot_run()
    _write(tmp_path, [{"step": 0, "train/loss": 2.0}, {"step": 1, "train/loss": 1.0}])
    assert pr.main([str(tmp_path)]) == 0
    _, notes = pr.plot_run(tmp_path)
    assert any("'reward'" in n and "rollout/reward_mean" in n for n in notes)
    assert len(notes) == len(pr.PANELS) - 1


def test_bad_inputs_name_the_file(tmp_path):
    pr = _plot_run()
    with pytest.raises(pr.PlotError, match="metrics.jsonl: not found"):
        pr.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(pr.PlotError, match=r"metrics.jsonl:2: malformed JSON"):
        pr.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(pr.PlotError, match="'step'"):
        pr.plot_run(tmp_path)
    _write(tmp_path, [{"step": 0, "other": 1.0}])
    with pytest.raises(pr.PlotError, match="none of the plotted metrics"):
        pr.plot_run(tmp_path)
    assert pr.main([str(tmp_path)]) == 1
