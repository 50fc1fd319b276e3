"""The draft in whole runs: sft trains it beside the policy (checkpoint, convert, export),
`miles-fsdp train-draft` trains it alone on SFT data or self-distilled continuations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from miles_fsdp.cli import main as cli
from miles_fsdp.commands.convert import ConvertConfig, main as convert
from miles_fsdp.models import load_model
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.sft import SFTConfig, train_sft
from miles_fsdp.train.trainer import TrainerConfig

ROWS = [{"prompt": f"count {i}: ", "response": " ".join(str(i + j) for j in range(6))} for i in range(8)]


def test_sft_trains_checkpoints_and_exports_the_draft(ckpt, data, tmp_path):
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(ckpt), data=str(data), out=str(out), steps=3, global_batch_size=4, max_seq_len=64,
                    trainer=TrainerConfig(optim=OptimConfig(lr=3e-3), max_tokens_per_micro_batch=64),
                    draft=DraftConfig(n_mtp=1, loss_coef=0.5))
    history = train_sft(cfg)
    assert all(m["draft/loss"] > 0 and 0 <= m["draft/acc"] <= 1 and m["draft/lr"] == 1e-4 for m in history)
    assert "draft/loss" in read_metrics(out)[-1]
    step_dir = out / "checkpoints" / "step_00000003"
    assert json.loads((step_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    hf = out / "hf"
    assert json.loads((hf / "config.json").read_text())["num_nextn_predict_layers"] == 1
    exported = load_file(hf / "model.safetensors")
    fresh = load_model(ckpt, n_mtp=1)
    assert not torch.equal(exported["mtp.fc.weight"], fresh.mtp[0].eh_proj.weight)  # trained
    conv = convert(ConvertConfig(checkpoint=str(step_dir), out=str(tmp_path / "conv"), dtype="float32"))
    back = load_file(conv / "model.safetensors")
    assert back.keys() == exported.keys() and all(torch.equal(back[k], exported[k]) for k in back)
    # resuming the run continues the draft's optimizer from the checkpoint (exactness: test_draft.py)
    cfg.steps = 4
    assert len(train_sft(cfg)) == 1


@pytest.mark.parametrize("self_distill", [False, True])
def test_train_draft_command_trains_only_the_draft(ckpt, data, tmp_path, self_distill):
    out = tmp_path / "draft"
    args = ["train-draft", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "4",
            "--global-batch-size", "4", "--max-seq-len", "64", "--max-tokens-per-micro-batch", "128",
            "--draft.optim.lr", "3e-3"]
    if self_distill:
        args += ["--self-distill", "--max-new-tokens", "12"]
    assert cli(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["draft/loss"] < rows[0]["draft/loss"]
    trained, base = load_model(out / "hf"), load_model(ckpt)
    assert trained.args.n_mtp == 1
    for k, v in base.state_dict().items():  # the trunk is untouched
        assert torch.equal(trained.state_dict()[k], v), k
    fresh = load_model(ckpt, n_mtp=1)
    assert not torch.equal(trained.mtp[0].eh_proj.weight, fresh.mtp[0].eh_proj.weight)
