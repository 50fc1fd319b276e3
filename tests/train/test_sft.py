"""SFT end to end on a tiny random Qwen3 checkpoint: masks, loss goes down, metrics,
checkpoint, HF export that transformers loads, and `convert` from the DCP checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from miles_fsdp.commands.convert import ConvertConfig, main as convert
from miles_fsdp.observe.metrics import read_metrics
from miles_fsdp.observe.profiler import ProfileConfig
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.sft import SFTConfig, train_sft
from miles_fsdp.train.sft_data import DataError, load_sft_jsonl
from miles_fsdp.train.trainer import TrainerConfig

ROWS = [
    {"prompt": "2+2=", "response": "4"},
    {"prompt": "capital of France? ", "response": "Paris"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "color of sky?"},
                  {"role": "assistant", "content": "blue"}]},
]


def test_masks_cover_only_responses(ckpt, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    seqs = load_sft_jsonl(data, tok, max_seq_len=256)
    trained = [tok.decode([t for t, m in zip(s.tokens, s.loss_mask) if m]) for s in seqs]
    assert trained[0] == "4<|im_end|>" and trained[1] == "Paris<|im_end|>"
    assert trained[2] == "hello!<|im_end|>\n" and trained[3] == "blue<|im_end|>\n"


@pytest.mark.parametrize("line, match", [
    ("{not json", "sft.jsonl:2: malformed JSON"),
    ('{"prompt": "a"}', "sft.jsonl:2: expected keys"),
    ('{"messages": [{"role": "user"}]}', r"sft.jsonl:2: messages\[0\]"),
])
def test_bad_lines_name_file_and_line(ckpt, tmp_path, line, match):
    from transformers import AutoTokenizer

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        load_sft_jsonl(path, AutoTokenizer.from_pretrained(ckpt), 256)


def test_sft_trains_exports_and_converts(ckpt, data, tmp_path):
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(ckpt), data=str(data), out=str(out), steps=8, global_batch_size=4, max_seq_len=64,
                    trainer=TrainerConfig(optim=OptimConfig(lr=3e-3), max_tokens_per_micro_batch=64),
                    profile=ProfileConfig(steps=(3,)))
    history = train_sft(cfg)
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["step_00003_rank0.json", "step_00003_rank0.txt"]
    losses = [m["train/loss"] for m in history]
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2]), losses

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train/loss"] == pytest.approx(losses[-1]) and "train/grad_norm" in rows[-1]
    assert any((out / "tb").iterdir())
    step_dir = out / "checkpoints" / "step_00000008"
    assert (step_dir / ".metadata").is_file()

    # the exported HF model loads in transformers and matches the training loss
    from transformers import AutoModelForCausalLM

    # the data mixes text prompts and chat messages: no prompt format is recorded (the tokenizer decides)
    assert "prompt_format" not in json.loads((out / "hf" / "generation_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = tok("capital of France? Paris", return_tensors="pt")["input_ids"]
    logits = hf(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert nll < torch.nn.functional.cross_entropy(base(ids).logits[0][:-1], ids[0, 1:])

    conv = convert(ConvertConfig(checkpoint=str(step_dir), out=str(tmp_path / "conv"), dtype="float32"))
    a, b = load_file(conv / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_rejects_non_checkpoint(tmp_path):
    from miles_fsdp.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=str(tmp_path)):
        convert(ConvertConfig(checkpoint=str(tmp_path), out=str(tmp_path / "o")))


def test_sft_rerun_continues_from_its_checkpoint_refuses_without_one_or_starts_over(ckpt, data, tmp_path):
    from miles_fsdp.train.checkpoint import CheckpointConfig
    from miles_fsdp.train.run_dir import RunDirError

    out = tmp_path / "run"

    def cfg(steps, **kw):
        return SFTConfig(model=str(ckpt), data=str(data), out=str(out), steps=steps, global_batch_size=4,
                         max_seq_len=64, export_hf=False,
                         trainer=TrainerConfig(optim=OptimConfig(lr=3e-3), max_tokens_per_micro_batch=64), **kw)

    train_sft(cfg(2))
    assert len(train_sft(cfg(3))) == 1  # resume="auto" finds step 2: only step 3 runs
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    with pytest.raises(RunDirError, match=r"already holds a run.*--out.*--overwrite"):
        train_sft(cfg(3, checkpoint=CheckpointConfig(resume="never")))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # untouched
    train_sft(cfg(2, overwrite=True))
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    [old] = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert [r["step"] for r in read_metrics(old)] == [1, 2, 3]


def test_sft_failure_keeps_the_steps_that_ran_in_the_log(ckpt, data, tmp_path, monkeypatch):
    """Each step's metrics are read once the next step is queued: a step that fails still leaves
    the one before it in the log."""
    from miles_fsdp.train.trainer import Trainer

    queue = Trainer.train_step_async

    def third_fails(self, *a, **k):
        if self.step == 2:
            raise RuntimeError("step 3 failed")
        return queue(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step_async", third_fails)
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(ckpt), data=str(data), out=str(out), steps=4, global_batch_size=4, max_seq_len=64,
                    export_hf=False, trainer=TrainerConfig(max_tokens_per_micro_batch=64))
    with pytest.raises(RuntimeError, match="step 3 failed"):
        train_sft(cfg)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_sft_on_chat_data_records_the_chat_prompt_format(ckpt, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS if "messages" in r) + "\n")
    out = tmp_path / "run"
    train_sft(SFTConfig(model=str(ckpt), data=str(path), out=str(out), steps=1, global_batch_size=2, max_seq_len=64,
                        trainer=TrainerConfig(max_tokens_per_micro_batch=64)))
    assert json.loads((out / "hf" / "generation_config.json").read_text())["prompt_format"] == "chat"
