"""The MTP draft trained online in the RL loop (speculation on): acceptance rises, the policy
is the same as with the draft left alone, resume is exact, the export carries the draft."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.models import load_model
from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.rl.config import RLConfig, RolloutConfig
from miles_fsdp.rl.loop import run_rl
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.export import export_hf
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

LETTERS = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]  # byte-level tokenizer: id = byte


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny policy first taught to continue the alphabet (so its samples are predictable
    and a draft can learn them), prompts of four letters, a reward that ranks samples."""
    root = tmp_path_factory.mktemp("rl_draft")
    base = build_tiny_checkpoint(root / "base", "qwen3")
    g = torch.Generator().manual_seed(0)
    trainer = Trainer(load_model(base), TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=256))
    for _ in range(20):
        starts = torch.randint(0, 26, (8,), generator=g).tolist()
        trainer.train_step(trainer.pack([TrainSeq([LETTERS[(s + i) % 26] for i in range(24)]) for s in starts]),
                           sft_loss)
    ckpt = export_hf(trainer.model, root / "ckpt")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "".join(chr(LETTERS[(s + i) % 26]) for i in range(4)), "label": ""})
                            + "\n" for s in range(26)))
    (root / "my_reward.py").write_text("def reward(sample):\n    return sum(sample.response_ids) % 3 / 2\n")
    return root, ckpt, data


def _cfg(setup, name, steps=3, draft=None, **kw) -> RLConfig:
    root, ckpt, data = setup
    return RLConfig(
        model=str(ckpt), data=DataConfig(path=str(data), prompts_per_batch=4), run_dir=str(root / name), steps=steps,
        rollout=RolloutConfig(n_samples_per_prompt=2, max_new_tokens=12, reward=f"{root}/my_reward.py:reward"),
        trainer=TrainerConfig(optim=OptimConfig(lr=1e-4)), engine=EngineConfig(num_speculative_tokens=2),
        draft=draft or DraftConfig(optim=OptimConfig(lr=1e-2)), **kw)


def _rows(setup, name):
    return [r for r in read_metrics(setup[0] / name) if "train/loss" in r]


def test_online_draft_learns_and_acceptance_rises(setup):
    # the checkpoint has no draft: speculation builds a fresh one, trained on every rollout batch
    run_rl(_cfg(setup, "online", steps=6, export_hf=True))
    rows = _rows(setup, "online")
    assert all(r["train/logprob_abs_diff_max"] == 0.0 for r in rows)  # speculation is exact
    acc = [r["engine/spec_accept_rate"] for r in rows]
    assert acc[-1] > acc[0] + 0.2, acc
    assert rows[-1]["draft/loss"] < rows[0]["draft/loss"] / 2 and rows[-1]["draft/acc"] > rows[0]["draft/acc"] + 0.3
    assert {"draft/lr", "draft/grad_norm"} <= rows[0].keys()
    hf = Path(setup[0] / "online" / "hf")
    assert json.loads((hf / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "mtp.fc.weight" in load_file(str(hf / "model.safetensors"))


def test_policy_is_the_same_with_the_draft_trained_or_left_alone_and_resume_is_exact(setup):
    run_rl(_cfg(setup, "on"))
    run_rl(_cfg(setup, "off", draft=DraftConfig(enabled=False)))
    keys = ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/entropy")
    on, off = _rows(setup, "on"), _rows(setup, "off")
    assert [[r[k] for k in keys] for r in on] == [[r[k] for k in keys] for r in off]
    assert "draft/loss" in on[0] and "draft/loss" not in off[0]
    w_on, w_off = (load_file(str(setup[0] / n / "hf" / "model.safetensors")) for n in ("on", "off"))
    draft_keys = [k for k in w_on if k.startswith("mtp.")]
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on if k not in draft_keys)
    assert any(not torch.equal(w_on[k], w_off[k]) for k in draft_keys)
    # stopped after 2 steps and resumed: the same 3 steps as "on", draft included
    run_rl(_cfg(setup, "resumed", steps=2, checkpoint_every=2, export_hf=False))
    run_rl(_cfg(setup, "resumed", resume=True))
    keys += ("draft/loss", "draft/acc", "engine/spec_accept_rate")
    assert [[r[k] for k in keys] for r in _rows(setup, "resumed")] == [[r[k] for k in keys] for r in on]
    w_res = load_file(str(setup[0] / "resumed" / "hf" / "model.safetensors"))
    assert w_res.keys() == w_on.keys() and all(torch.equal(w_res[k], w_on[k]) for k in w_on)
