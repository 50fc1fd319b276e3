"""RLConfig: bad settings are refused at construction, by flag name; no setting is silently
changed; the scoring spec and loss normalisation are derived, not copied into other configs."""

import json
import os
import re
import subprocess
import sys

import pytest

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.rl.config import AlgoConfig, EvalConfig, RLConfig, RolloutConfig
from miles_fsdp.train.loss import LossNorm
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import TrainerConfig


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": 256}))
    return str(tmp_path)


def _cfg(model_dir, **kw):
    return RLConfig(model=model_dir, data=DataConfig(path="train.jsonl"), **kw)


@pytest.mark.parametrize("make, flag", [
    (lambda: RolloutConfig(top_p=0.0), "--rollout.top-p"),
    (lambda: RolloutConfig(top_p=1.5), "--rollout.top-p"),
    (lambda: RolloutConfig(top_k=-5), "--rollout.top-k"),
    (lambda: EvalConfig(n_samples=0), "--eval.n-samples"),
    (lambda: EvalConfig(max_prompts=-3), "--eval.max-prompts"),
    (lambda: EvalConfig(temperature=-1.0), "--eval.temperature"),
    (lambda: EvalConfig(every=-1), "--eval.every"),
])
def test_bad_settings_name_their_flag(make, flag):
    with pytest.raises(ValueError, match=flag):
        make()


def test_lengths_beyond_the_model_context_are_refused_before_loading(model_dir):
    with pytest.raises(ValueError, match=r"--rollout.max-new-tokens.*context of 256 tokens"):
        _cfg(model_dir, rollout=RolloutConfig(max_new_tokens=300))
    with pytest.raises(ValueError, match=r"--eval.max-new-tokens.*256"):
        _cfg(model_dir, rollout=RolloutConfig(max_new_tokens=100), eval=EvalConfig(max_new_tokens=256))
    with pytest.raises(ValueError, match=r"--data.max-prompt-len"):
        RLConfig(model=model_dir, data=DataConfig(path="t.jsonl", max_prompt_len=200),
                 rollout=RolloutConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match=r"engine.max_model_len"):  # the engine's limit, when set, rules
        _cfg(model_dir, engine=EngineConfig(max_model_len=64, kv_memory_bytes=1 << 20),
             rollout=RolloutConfig(max_new_tokens=64))
    with pytest.raises(ValueError, match="--checkpoint-every"):
        _cfg(model_dir, checkpoint_every=-1)
    _cfg(model_dir, rollout=RolloutConfig(max_new_tokens=200))  # fits


def test_user_settings_are_kept_and_defaults_follow_the_estimator():
    assert (AlgoConfig().eps_low, AlgoConfig().eps_high, AlgoConfig().aggregation) == (0.2, 0.2, "token-mean")
    gspo = AlgoConfig(advantage="gspo")
    assert (gspo.eps_low, gspo.eps_high) == (3e-4, 4e-4)
    assert AlgoConfig(advantage="gspo", eps_low=0.2, eps_high=0.2).eps_low == 0.2  # given: honoured
    assert AlgoConfig(advantage="dr_grpo").aggregation == "constant"
    assert AlgoConfig(advantage="dr_grpo", aggregation="token-mean").aggregation == "token-mean"


def test_scoring_spec_and_loss_norm_are_derived_not_written_into_the_trainer(model_dir):
    trainer = TrainerConfig()
    cfg = _cfg(model_dir, rollout=RolloutConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=100),
               algo=AlgoConfig(advantage="dr_grpo"), trainer=trainer, kernel_mode="fast")
    assert cfg.scoring == ScoringSpec(0.7, 20, 0.9, "fast")
    assert cfg.loss_norm == (LossNorm.constant, 100.0)
    assert cfg.trainer == TrainerConfig() and not hasattr(cfg.trainer, "temperature")


def test_rl_help_shows_no_trainer_sampling_or_loss_norm_flags():
    out = subprocess.run([sys.executable, "-m", "miles_fsdp.cli", "rl", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "400"})
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9.\-]*)", out.stdout))
    for gone in ("--trainer.temperature", "--trainer.top-k", "--trainer.top-p", "--trainer.loss-norm"):
        assert gone not in flags
    assert {"--rollout.temperature", "--rollout.top-k", "--rollout.top-p", "--algo.aggregation"} <= flags


def test_a_run_dir_holding_a_run_is_refused_or_moved_aside(tmp_path):
    from miles_fsdp.train.run_dir import RunDirError, prepare_run_dir

    run = tmp_path / "run"
    assert prepare_run_dir(run, False, False, "--resume", "--run-dir") == run and run.is_dir()  # new: created
    prepare_run_dir(run, False, False, "--resume", "--run-dir")  # empty: fine
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"--resume.*--run-dir.*--overwrite"):
        prepare_run_dir(run, False, False, "--resume", "--run-dir")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    prepare_run_dir(run, True, False, "--resume", "--run-dir")  # continue: untouched
    assert (run / "metrics.jsonl").exists()
    with pytest.raises(RunDirError, match="pass one"):
        prepare_run_dir(run, True, True, "--resume", "--run-dir")
    prepare_run_dir(run, False, True, "--resume", "--run-dir")  # overwrite: moved aside, never deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert run.is_dir() and not any(run.iterdir())
