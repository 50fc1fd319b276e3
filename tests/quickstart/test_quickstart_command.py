"""The README's first command, shortened: SFT then RL through the console script, on CPU.

The run is tests/conftest.py's `quickstart_short` (shared with tests/cli/test_readme_commands.py):
~45 s on an idle 2-core machine, ~110 s with a busy-loop process beside it (over 14 min before
miles_fsdp/threads.py bounded OpenMP's spin-waits). It gets a timeout inside pytest's limit, so a
slow run fails with the log of where it got to.
"""

import json

import pytest

from miles_fsdp.observe.metrics import read_metrics


def test_quickstart_short_runs_end_to_end_and_rl_improves(quickstart_short):
    run, stdout = quickstart_short
    assert "held-out accuracy after RL" in stdout
    summary = json.loads((run / "summary.json").read_text())
    spec = summary["speculation"]  # the draft trained in SFT and RL; the final eval with it on vs off
    assert spec["outputs_identical"] is True and summary["mean_accept_length"] == spec["mean_accept_length"] > 1.2
    assert "draft mean accept length" in stdout
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


def test_rerun_into_a_used_run_dir_refuses_or_moves_the_old_run_aside(tmp_path, monkeypatch):
    from miles_fsdp.commands import quickstart
    from miles_fsdp.train.run_dir import RunDirError

    run = tmp_path / "qs"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # an earlier quickstart
    with pytest.raises(RunDirError, match=r"already holds a run.*--run-dir.*--overwrite"):
        quickstart.main(quickstart.QuickstartConfig(run_dir=str(run)))
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]  # untouched

    class Stop(Exception):
        pass

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(quickstart, "train_sft", stop)  # stop once the new run has its data
    with pytest.raises(Stop):
        quickstart.main(quickstart.QuickstartConfig(run_dir=str(run), overwrite=True, short=True))
    (old,) = tmp_path.glob("qs.old-*")
    assert (old / "summary.json").read_text() == "{}" and (run / "data").is_dir() and not (run / "summary.json").exists()
