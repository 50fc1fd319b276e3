import dataclasses

from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.quickstart.model import num_params, write_tiny_model
from miles_fsdp.quickstart.presets import quickstart_preset, rl_config
from miles_fsdp.quickstart.task import write_task
from miles_fsdp.rl.config import RLConfig
from miles_fsdp.rl.loop import run_rl


def test_full_preset_is_the_measured_one(tmp_path):
    p = quickstart_preset()
    assert (p.task.min_digits, p.task.max_digits) == (1, 2)
    assert p.task.total <= p.task.num_pairs
    assert 300_000 < num_params(p.model) < 3_000_000
    cfg = rl_config(p, tmp_path / "sft", tmp_path / "data", tmp_path / "run")
    assert isinstance(cfg, RLConfig)
    dataclasses.replace(cfg)  # every __post_init__ check passes
    assert cfg.data.path.endswith("rl.jsonl") and cfg.eval.path.endswith("heldout.jsonl")
    assert cfg.rollout.reward == "exact_match" and cfg.trainer.temperature == cfg.rollout.temperature


def test_short_preset_is_smaller_everywhere():
    full, short = quickstart_preset(), quickstart_preset(short=True)
    assert short.task.total < full.task.total
    assert num_params(short.model) < num_params(full.model)
    assert short.sft.steps < full.sft.steps and short.rl.steps < full.rl.steps


def test_short_rl_stage_runs_on_policy_from_a_fresh_model(tmp_path):
    p = quickstart_preset(short=True)
    data = tmp_path / "data"
    write_task(data, p.task)
    model = write_tiny_model(tmp_path / "init", p.model)
    summary = run_rl(rl_config(p, model, data, tmp_path / "run"))
    rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(rows) == p.rl.steps
    assert all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["eval/num_prompts"] == p.task.num_heldout


def test_short_pipeline_sft_then_rl(tmp_path):
    """The quickstart's stages at CI size: task -> fresh model -> SFT (export) -> RL from it."""
    from miles_fsdp.quickstart.presets import sft_config
    from miles_fsdp.train.sft import train_sft

    p = quickstart_preset(short=True)
    data = tmp_path / "data"
    write_task(data, p.task)
    init = write_tiny_model(tmp_path / "init", p.model)
    history = train_sft(sft_config(p, init, data, tmp_path / "sft"))
    assert len(history) == p.sft.steps
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    sft_model = tmp_path / "sft" / "hf"
    assert (sft_model / "tokenizer.json").is_file()
    summary = run_rl(rl_config(p, sft_model, data, tmp_path / "rl"))
    assert summary["logprob_abs_diff_max"] == 0.0 and summary["steps"] == p.rl.steps
