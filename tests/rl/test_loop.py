"""The RL loop end to end on a tiny random model: true on-policy every step, all modes."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from rl_helpers import rl_args, rl_cmd
from torchrun import torchrun

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.rl.config import AlgoConfig, EvalConfig, RLConfig, RolloutConfig
from miles_fsdp.rl.loop import run_rl
from miles_fsdp.train.checkpoint import CheckpointError
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.trainer import TrainerConfig

REWARD = '''
def reward(sample):
    # prefers even token ids: a dense signal, so every group has distinct rewards
    ids = sample.response_ids
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3")
    moe = build_tiny_checkpoint(root / "moe", "qwen3_moe")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(40)))
    (root / "my_reward.py").write_text(REWARD)
    return root, ckpt, moe, data


def _cfg(root, ckpt, data, name, **kw) -> RLConfig:
    rollout = kw.pop("rollout", {})
    algo = kw.pop("algo", {})
    return RLConfig(
        model=str(ckpt), data=DataConfig(path=str(data), prompts_per_batch=4), run_dir=str(root / name),
        steps=kw.pop("steps", 3),
        rollout=RolloutConfig(**{"n_samples_per_prompt": 4, "max_new_tokens": 6,
                                 "reward": f"{root}/my_reward.py:reward", **rollout}),
        algo=AlgoConfig(**algo),
        trainer=TrainerConfig(optim=OptimConfig(lr=3e-3, warmup_steps=0)),
        **kw)


def test_invariant_run_is_on_policy_every_step_and_learns(setup):
    root, ckpt, _, data = setup
    summary = run_rl(_cfg(root, ckpt, data, "grpo", steps=4, eval=EvalConfig(path=str(data), max_prompts=4)))
    rows = [r for r in read_metrics(root / "grpo") if "train/loss" in r]
    assert len(rows) == 4
    assert all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    assert all(r["train/grad_norm"] > 0 for r in rows)  # real updates: later steps check new weights
    assert summary["logprob_abs_diff_max"] == 0.0
    assert (root / "grpo" / "hf" / "model.safetensors").exists()
    # the data's prompts are text: `generate --prompt` on the export encodes them as such
    assert json.loads((root / "grpo" / "hf" / "generation_config.json").read_text())["prompt_format"] == "plain"
    assert "eval/accuracy" in summary


@pytest.mark.parametrize("algo", [
    {"advantage": "gspo"}, {"advantage": "rloo", "kl_coef": 0.1}, {"advantage": "reinforce_pp_baseline"},
    {"advantage": "dr_grpo", "eps_high": 0.28, "dual_clip_c": 3.0},
    {"advantage": "reinforce_pp", "kl_reward_coef": 0.05},
])
def test_algorithms_stay_on_policy(setup, algo):
    root, ckpt, _, data = setup
    name = "algo_" + "_".join(str(v) for v in algo.values())
    run_rl(_cfg(root, ckpt, data, name, steps=2, algo=algo, export_hf=False))
    rows = [r for r in read_metrics(root / name) if "train/loss" in r]
    assert rows and all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    if algo.get("kl_coef"):
        assert "train/kl_ref" in rows[-1]
    if algo.get("kl_reward_coef"):  # step 1: policy == reference, bit for bit; then it moves away
        assert rows[0]["rollout/kl_reward_penalty"] == 0.0 and rows[1]["rollout/kl_reward_penalty"] != 0.0


def test_truncated_sampling_stays_on_policy(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "topp", steps=2, export_hf=False, rollout={"top_p": 0.8, "top_k": 20, "temperature": 0.9}))
    rows = [r for r in read_metrics(root / "topp") if "train/loss" in r]
    assert rows and all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)


def test_moe_on_policy(setup):
    root, _, moe, data = setup
    run_rl(_cfg(root, moe, data, "moe_run", steps=2, export_hf=False))
    rows = [r for r in read_metrics(root / "moe_run") if "train/loss" in r]
    assert all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)


def test_fast_mode_logs_mismatch_and_corrects(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "fast", steps=2, kernel_mode="fast", export_hf=False,
                algo={"correction": "tis", "tis_cap": 2.0}))
    rows = [r for r in read_metrics(root / "fast") if "train/loss" in r]
    assert all("train/logprob_abs_diff_max" in r and "train/is_weight_mean" in r for r in rows)
    with pytest.raises(ValueError, match="kernel_mode=fast"):
        _cfg(root, ckpt, data, "bad", algo={"correction": "tis"})


def test_dynamic_sampling_drops_flat_groups(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "dapo", steps=1, export_hf=False,
                rollout={"dynamic_sampling": True, "reward": "exact_match"}))
    row = [r for r in read_metrics(root / "dapo") if "rollout/groups_dropped" in r][0]
    assert row["rollout/groups_dropped"] > 0  # random model: every exact-match group scores all 0
    assert row["rollout/samples"] == 0 and row["train/skipped_step"] == 1.0  # skipped, not crashed


def test_rollout_only_then_train_only(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "dbg", steps=2, debug_mode="rollout_only"))
    files = sorted((root / "dbg" / "rollouts").glob("*.jsonl"))
    assert len(files) == 2
    run_rl(_cfg(root, ckpt, data, "dbg_train", steps=2, debug_mode="train_only",
                rollout_dir=str(root / "dbg" / "rollouts"), export_hf=False))
    rows = [r for r in read_metrics(root / "dbg_train") if "train/loss" in r]
    # the first train-only step sees the weights that generated the saved batch
    assert len(rows) == 2 and rows[0]["train/logprob_abs_diff_max"] == 0.0


def _final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "hf" / "model.safetensors"))


def test_exact_resume(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "straight", steps=4))
    run_rl(_cfg(root, ckpt, data, "resumed", steps=2, checkpoint_every=2, export_hf=False))
    run_rl(_cfg(root, ckpt, data, "resumed", steps=4, resume=True))
    a = [r for r in read_metrics(root / "straight") if "train/loss" in r]
    b = [r for r in read_metrics(root / "resumed") if "train/loss" in r]
    keys = ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/entropy")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    wa, wb = _final_weights(root / "straight"), _final_weights(root / "resumed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(CheckpointError, match="no step_"):
        run_rl(_cfg(root, ckpt, data, "never_saved", steps=1, resume=True))


def test_two_ranks_on_policy(setup):
    root, ckpt, _, data = setup
    run = root / "two_ranks"
    torchrun(rl_args(root, ckpt, data, run, 2, "--no-export-hf", "--trainer.optim.lr", "3e-3"), timeout=300,
             before_retry=lambda: shutil.rmtree(run, ignore_errors=True))  # a retry starts a fresh run dir
    rows = [r for r in read_metrics(run) if "train/loss" in r]
    assert len(rows) == 2 and all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    assert rows[0]["rollout/samples"] == 16  # both ranks' samples counted once


def test_sigterm_checkpoints_then_resumes(setup):
    import signal
    import time

    root, ckpt, _, data = setup
    run = root / "sigterm"
    cmd = rl_cmd(root, ckpt, data, run, 500, "--no-export-hf")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any("train/loss" in r for r in _rows_or_empty(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps, "SIGTERM must leave a checkpoint"
    stopped_at = int(steps[-1].split("_")[1])
    assert 1 <= stopped_at < 500 and len([r for r in read_metrics(run) if "train/loss" in r]) == stopped_at
    summary = run_rl(_cfg(root, ckpt, data, "sigterm", steps=stopped_at + 1, resume=True, export_hf=False))
    assert summary["steps"] == stopped_at + 1 and summary["logprob_abs_diff_max"] == 0.0


def _rows_or_empty(run_dir):
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def test_release_engine_memory_changes_nothing_but_memory(setup, monkeypatch):
    from miles_fsdp.engine.engine import Engine

    root, ckpt, _, data = setup
    calls = []
    for name in ("release", "resume"):
        orig = getattr(Engine, name)
        monkeypatch.setattr(Engine, name, lambda self, _o=orig, _n=name: (calls.append(_n), _o(self))[1])
    run_rl(_cfg(root, ckpt, data, "kept", steps=2, export_hf=False))
    assert calls == []
    run_rl(_cfg(root, ckpt, data, "released", steps=2, export_hf=False, release_engine_memory=True))
    assert calls == ["release", "resume"] * 2
    keys = ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/logprob_abs_diff_max")
    rows = lambda d: [[r[k] for k in keys] for r in read_metrics(root / d) if "train/loss" in r]  # noqa: E731
    assert rows("released") == rows("kept") and rows("kept")[-1][-1] == 0.0
    with pytest.raises(ValueError, match=r"release_engine_memory=True \(--release-engine-memory\): frees a colocated engine"):
        _cfg(root, ckpt, data, "x", release_engine_memory=True, rollout={"servers": ("http://127.0.0.1:1",)})


def test_profile_steps_write_traces_with_phases(setup):
    from miles_fsdp.observe.profiler import ProfileConfig

    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "profiled", steps=2, export_hf=False, profile=ProfileConfig(steps=(2,))))
    prof = root / "profiled" / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["step_00002_rank0.json", "step_00002_rank0.txt"]
    names = {e.get("name") for e in json.loads((prof / "step_00002_rank0.json").read_text())["traceEvents"]}
    assert {"rollout", "train", "sync"} <= names  # the loop's phases are named ranges
    txt = (prof / "step_00002_rank0.txt").read_text()
    assert "Self CPU" in txt
    # where the time went, per host thread; the loop's phases are the main thread's top level
    assert "host thread" in txt and all(f"x  {phase}" in txt for phase in ("rollout", "train", "sync"))
    with pytest.raises(ValueError, match="1-based"):
        ProfileConfig(steps=(0,))


def test_exact_resume_across_processes(setup):
    # what a user does: a run stops, a new process resumes it; the result is the straight run's
    root, ckpt, _, data = setup

    def cli(name, steps, *extra):
        cmd = rl_cmd(root, ckpt, data, root / name, steps, "--trainer.optim.lr", "3e-3", *extra)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    cli("xp_straight", 4)
    cli("xp_resumed", 2, "--checkpoint-every", "2", "--no-export-hf")
    cli("xp_resumed", 4, "--resume")
    keys = ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/entropy")
    rows = lambda d: [[r[k] for k in keys] for r in read_metrics(root / d) if "train/loss" in r]  # noqa: E731
    assert rows("xp_resumed") == rows("xp_straight") and len(rows("xp_straight")) == 4
    wa, wb = _final_weights(root / "xp_straight"), _final_weights(root / "xp_resumed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_log_samples_and_resume_drops_rows_past_the_checkpoint(setup):
    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "crashed", steps=3, checkpoint_every=2, export_hf=False, log_samples=2))
    # as if the process died after logging step 3 and before its checkpoint: step 3 is redone
    shutil.rmtree(root / "crashed" / "checkpoints" / "step_00000003")
    run_rl(_cfg(root, ckpt, data, "crashed", steps=4, resume=True, export_hf=False, log_samples=2))
    steps = [r["step"] for r in read_metrics(root / "crashed") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (root / "crashed" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert {"prompt", "response", "label", "reward", "status"} <= rows[0].keys()
    a = rows[0]["prompt"].split("+")[0]
    assert rows[0]["prompt"] == f"{a}+{a}=" and rows[0]["label"] == str(2 * int(a))


def test_rerun_in_a_run_dir_is_refused_or_starts_over_with_the_old_run_kept(setup):
    from miles_fsdp.train.run_dir import RunDirError

    root, ckpt, _, data = setup
    run_rl(_cfg(root, ckpt, data, "again", steps=1, export_hf=False, checkpoint_every=1))
    with pytest.raises(RunDirError, match=r"already holds a run.*--resume.*--run-dir.*--overwrite"):
        run_rl(_cfg(root, ckpt, data, "again", steps=2, export_hf=False))
    run_rl(_cfg(root, ckpt, data, "again", steps=2, export_hf=False, overwrite=True))
    assert [r["step"] for r in read_metrics(root / "again") if "train/loss" in r] == [1, 2]
    [old] = [p for p in root.iterdir() if p.name.startswith("again.old-")]
    assert [r["step"] for r in read_metrics(old) if "train/loss" in r] == [1]
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step_00000001"]
