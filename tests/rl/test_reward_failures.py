"""Reward functions that hang, fail everywhere or are interrupted: the run never hangs,
never trains on garbage silently, and a stop signal during scoring ends it promptly with a
checkpoint that resumes exactly."""

import json
import os
import signal
import subprocess
import time

import pytest
from rl_helpers import rl_cmd

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.rl.config import RLConfig, RolloutConfig
from miles_fsdp.rl.loop import run_rl
from miles_fsdp.rl.rollout import RewardFunctionError

REWARDS = '''
import os, threading, time

def slow_first(sample):
    # sample 0 of every batch takes far longer than the timeout; the rest score at once
    if sample.index == 0:
        time.sleep(30)
    return 1.0 if sample.index % 2 else 0.0

def none_reward(sample):
    return None

CALLS = [0]

def hangs_on_step_two(sample):
    # the first step scores normally; from then on a call never returns (unless RELEASE is set)
    CALLS[0] += 1
    if CALLS[0] > 16 and not os.environ.get("RELEASE"):
        threading.Event().wait()
    return float(sample.index % 2)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(40)))
    (root / "rewards.py").write_text(REWARDS)
    return root, ckpt, data


def _cfg(root, ckpt, data, name, reward, **rollout):
    return RLConfig(model=str(ckpt), data=DataConfig(path=str(data), prompts_per_batch=4), run_dir=str(root / name),
                    steps=2, export_hf=False, log_samples=16,
                    rollout=RolloutConfig(n_samples_per_prompt=4, max_new_tokens=6,
                                          reward=f"{root}/rewards.py:{reward}", **rollout))


def test_a_reward_past_its_timeout_is_scored_on_error_counted_and_logged(setup):
    root, ckpt, data = setup
    t0 = time.perf_counter()
    run_rl(_cfg(root, ckpt, data, "timeout", "slow_first", reward_timeout_s=1.0, reward_on_error=-1.0))
    assert time.perf_counter() - t0 < 25  # two steps, each waiting one timeout, not 30 s sleeps
    rows = [r for r in read_metrics(root / "timeout") if "train/loss" in r]
    assert [r["rollout/reward_timeouts"] for r in rows] == [1.0, 1.0]
    assert all(r["rollout/reward_errors"] == 1.0 for r in rows)
    logged = [json.loads(line) for line in (root / "timeout" / "samples.jsonl").read_text().splitlines()]
    first = [s for s in logged if s["index"] == 0]
    assert first and all(s["reward"] == -1.0 and "timed out" in s["reward_error"] for s in first)
    assert all(s["reward_error"] is None for s in logged if s["index"] != 0)


def test_a_reward_that_fails_on_every_first_sample_stops_the_run(setup):
    root, ckpt, data = setup
    with pytest.raises(RewardFunctionError, match=r"failed on all 16 samples of the first rollout batch.*None"):
        run_rl(_cfg(root, ckpt, data, "none", "none_reward"))
    assert not [r for r in read_metrics(root / "none") if "train/loss" in r]  # nothing was trained


def test_sigterm_while_a_reward_hangs_checkpoints_and_resumes_exactly(setup):
    root, ckpt, data = setup
    run = root / "hang"
    cmd = rl_cmd(root, ckpt, data, run, 3, "--no-export-hf", "--rollout.reward", f"{root}/rewards.py:hangs_on_step_two")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not [r for r in _rows(run) if "train/loss" in r]:
        time.sleep(0.5)
    time.sleep(3)  # step 2's rollout is done by now and its reward hangs
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode == 0, err[-2000:]
    assert "stop requested" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    # resume with a reward that returns: the discarded step 2 runs again, then step 3
    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "RELEASE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3]


def _rows(run):
    try:
        return read_metrics(run)
    except (FileNotFoundError, ValueError):
        return []
