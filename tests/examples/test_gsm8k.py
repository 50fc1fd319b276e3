"""examples/gsm8k: the converter, the presets, and one RL step of the example entry point on
a random tiny Qwen3 checkpoint (same architecture as Qwen3-0.6B, tiny sizes)."""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.rl.config import RLConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gsm8k"

GSM8K_LINES = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A farm sells 1,200 eggs a day. How many in 2 days?",
     "answer": "1200 * 2 = <<1200*2=2400>>2400\n#### 2,400"},
    {"question": "Jo owes $5 and pays $8. What is her balance?", "answer": "5 - 8 = -3\n#### -3"},
]


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield importlib.import_module("convert_gsm8k"), importlib.import_module("presets"), importlib.import_module("train")
    finally:
        sys.path.remove(str(EXAMPLE))


def _write_gsm8k(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_converter_writes_chat_prompts_and_numeric_labels(example, tmp_path):
    convert, _, _ = example
    src = _write_gsm8k(tmp_path / "test.jsonl", GSM8K_LINES)
    assert convert.main([str(src), str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["7", "2400", "-3"]
    msg = rows[0]["prompt"][0]
    assert msg["role"] == "user" and msg["content"].startswith("Tom has 3 apples")
    assert msg["content"].endswith(convert.INSTRUCTION)
    # the output loads with the RL dataset's default keys, chat template applied
    ds = PromptDataset(DataConfig(path=str(tmp_path / "out.jsonl"), shuffle=False),
                       tokenize=lambda p: [len(m["content"]) for m in p])
    assert len(ds) == 3 and ds.next_batch(1)[0].label == "7"


@pytest.mark.parametrize("bad, match", [
    ('{"question": "q"}', r"test.jsonl:2: missing string field 'answer'"),
    ('{"question": "q", "answer": "no marker"}', r"test.jsonl:2: 'answer' has no '#### <number>'"),
    ("{not json", r"test.jsonl:2: malformed JSON"),
    ('{"question": "q", "answer": "x ####  "}', r"test.jsonl:2: nothing after '####'"),
])
def test_converter_errors_name_file_and_line(example, tmp_path, bad, match):
    convert, _, _ = example
    src = _write_gsm8k(tmp_path / "test.jsonl", [GSM8K_LINES[0], bad])
    with pytest.raises(convert.ConvertError, match=match):
        convert.convert_file(src, tmp_path / "out.jsonl")
    assert convert.main([str(src), str(tmp_path / "out.jsonl")]) == 1


def test_presets_build_valid_configs(example):
    _, presets, _ = example
    cfgs = {name: fn() for name, (_, fn) in presets.PRESETS.items()}
    assert set(cfgs) == {"qwen3-0.6b", "qwen3-4b", "qwen3-8b"}
    for name, cfg in cfgs.items():
        assert isinstance(cfg, RLConfig), name
        assert cfg.rollout.reward == "math" and cfg.kernel_mode == "invariant"
        assert cfg.scoring.temperature == cfg.rollout.temperature
        dataclasses.replace(cfg)  # re-runs every __post_init__ check on the whole tree
    # variants change only what they mean to: bigger batches, less KV memory
    sizes = [cfgs[n].data.prompts_per_batch for n in ("qwen3-0.6b", "qwen3-4b", "qwen3-8b")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert cfgs["qwen3-8b"].trainer.parallel.activation_checkpointing
    assert presets.qwen3_0p6b().trainer.parallel.activation_checkpointing is False  # fresh objects each call


def test_cli_overrides_a_preset(example, monkeypatch):
    _, _, train = example
    seen = {}
    monkeypatch.setattr(train, "run_rl", lambda cfg: seen.setdefault("cfg", cfg))
    train.main(["qwen3-4b", "--model", "/ckpt/q", "--steps", "3", "--rollout.max-new-tokens", "64"])
    cfg = seen["cfg"]
    assert (cfg.model, cfg.steps, cfg.rollout.max_new_tokens) == ("/ckpt/q", 3, 64)
    assert cfg.data.prompts_per_batch == 64  # the rest comes from the preset


def test_one_rl_step_on_a_tiny_qwen3(example, tmp_path):
    convert, _, train = example
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", "qwen3")
    _write_gsm8k(tmp_path / "gsm8k.jsonl", GSM8K_LINES)
    convert.convert_file(tmp_path / "gsm8k.jsonl", tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    summary = train.main([
        "qwen3-0.6b", "--model", str(ckpt), "--data.path", str(tmp_path / "train.jsonl"),
        "--data.prompts-per-batch", "2", "--data.max-prompt-len", "200", "--steps", "1",
        "--rollout.n-samples-per-prompt", "2", "--rollout.max-new-tokens", "4",
        "--engine.kv-memory-bytes", str(8 << 20), "--eval.path", "",
        "--checkpoint-every", "0", "--no-export-hf", "--run-dir", str(run_dir),
    ])
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(rows) == 1 and rows[0]["train/logprob_abs_diff_max"] == 0.0
    assert summary["steps"] == 1


def test_debug_rollout_only_then_train_only(example, tmp_path):
    """What debug_rollout_only.sh and debug_train_only.sh run, with the same flags."""
    convert, _, train = example
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", "qwen3")
    _write_gsm8k(tmp_path / "gsm8k.jsonl", GSM8K_LINES)
    convert.convert_file(tmp_path / "gsm8k.jsonl", tmp_path / "train.jsonl")
    common = ["qwen3-0.6b", "--model", str(ckpt), "--data.path", str(tmp_path / "train.jsonl"),
              "--data.prompts-per-batch", "2", "--rollout.n-samples-per-prompt", "2",
              "--rollout.max-new-tokens", "4", "--engine.kv-memory-bytes", str(8 << 20), "--eval.path", "",
              "--data.max-prompt-len", "240",  # the tiny checkpoint's context is 256 tokens
              "--checkpoint-every", "0", "--no-export-hf", "--steps", "2"]
    debug = tmp_path / "debug"
    train.main([*common, "--run-dir", str(debug), "--debug-mode", "rollout_only"])
    saved = sorted(p.name for p in (debug / "rollouts").iterdir())
    assert saved == ["step_00000_rank0.jsonl", "step_00001_rank0.jsonl"]
    train.main([*common, "--run-dir", str(debug / "train_only"), "--debug-mode", "train_only",
                "--rollout-dir", str(debug / "rollouts")])
    rows = [r for r in read_metrics(debug / "train_only") if "train/loss" in r]
    assert len(rows) == 2 and all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)


@pytest.mark.parametrize("script", ["run_1gpu.sh", "run_multi_gpu.sh", "run_disaggregated.sh", "debug_rollout_only.sh",
                                    "debug_train_only.sh"])
def test_scripts_parse_and_demand_a_model(script):
    import os
    import subprocess

    path = EXAMPLE / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "MODEL"}
    out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "set MODEL to a local Qwen3 HF checkpoint" in out.stderr
