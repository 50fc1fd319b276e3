"""Quickstart presets build valid stage configs; the short one is smaller everywhere."""

import dataclasses

from miles_fsdp.quickstart.model import num_params, write_tiny_model
from miles_fsdp.quickstart.presets import quickstart_preset, rl_config, sft_config
from miles_fsdp.rl.config import RLConfig


def test_full_preset_configs(tmp_path):
    p = quickstart_preset()
    assert 300_000 < num_params(p.model) < 3_000_000
    cfg = rl_config(p, tmp_path / "sft", tmp_path / "data", tmp_path / "run")
    assert isinstance(cfg, RLConfig)
    dataclasses.replace(cfg)  # every __post_init__ check passes
    assert cfg.data.path.endswith("rl.jsonl") and cfg.eval.path.endswith("heldout.jsonl")
    assert cfg.rollout.reward == "exact_match" and cfg.rollout.answer_extract == "full"
    assert cfg.scoring.temperature == cfg.rollout.temperature and cfg.kernel_mode == "invariant"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text('{"prompt": "rev ab=", "response": "ba"}\n')
    sft = sft_config(p, write_tiny_model(tmp_path / "init", p.model), tmp_path / "data", tmp_path / "sft")
    assert sft.steps == p.sft_steps and sft.data.endswith("sft.jsonl")


def test_short_preset_is_smaller():
    full, short = quickstart_preset(), quickstart_preset(short=True)
    assert short.task.num_sft < full.task.num_sft
    assert short.sft_steps < full.sft_steps and short.rl_steps < full.rl_steps
    assert quickstart_preset(seed=3).task.seed == 3
