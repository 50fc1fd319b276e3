"""2-process smoke: `miles-fsdp sft` under torchrun (gloo) trains, checkpoints, and a
second launch resumes from the checkpoint instead of starting over."""

import json

from torchrun import torchrun

from miles_fsdp.models.testing import build_tiny_checkpoint
from miles_fsdp.observe.metrics import read_metrics


def _launch(ckpt, data, out, steps):
    torchrun(["-m", "miles_fsdp.commands.sft", "--model", str(ckpt), "--data", str(data), "--out", str(out),
              "--steps", str(steps), "--global-batch-size", "4", "--max-seq-len", "64",
              "--trainer.max-tokens-per-micro-batch", "64", "--trainer.optim.lr", "0.003",
              "--trainer.parallel.activation-checkpointing", "--no-export-hf"], timeout=240)


def test_two_process_sft_and_resume(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "tiny", "qwen3")
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(6)))
    out = tmp_path / "run"
    _launch(ckpt, data, out, steps=3)
    assert (out / "checkpoints" / "step_00000003" / ".metadata").is_file()
    _launch(ckpt, data, out, steps=5)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed at 4, not restarted at 1
    assert all(r["train/tokens"] > 0 for r in rows)
