"""DCP checkpoints: 4 steps straight == 2 steps + save + fresh process state + resume + 2."""

import os
import signal

import pytest
import torch

from common import SEQ_LEN, full_grads, global_batch, make_trainer, pg_loss
from tiny_model import TinyLM

from miles_fsdp.train.checkpoint import (CheckpointError, StopSignal, latest_checkpoint, load_checkpoint,
                                         save_checkpoint)


def _batch(step: int):
    return global_batch(seed=step)  # a different batch each step, fixed by the step index


def _run(trainer, steps):
    return [trainer.train_step(trainer.pack(_batch(s)), pg_loss)["train/loss"] for s in steps]


def _weights(trainer):
    return {k: v.full_tensor().clone() for k, v in trainer.model.state_dict().items()}


def _make():
    # warmup + cosine so the LR schedule state matters; weight decay so the step count does
    return make_trainer(TinyLM(), 2 * SEQ_LEN, warmup_steps=2, schedule="cosine", total_steps=4,
                        weight_decay=0.1)


def test_resume_is_exact(tmp_path):
    straight = _make()
    losses_straight = _run(straight, range(4))

    first = _make()
    losses = _run(first, range(2))
    torch.manual_seed(1234)
    path = save_checkpoint(first, tmp_path, extra={"data_pos": 2}, keep=1)
    rng_after_save = torch.rand(3)
    assert path.name == "step_00000002" and latest_checkpoint(tmp_path) == path
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())

    torch.manual_seed(99)
    resumed = make_trainer(TinyLM(seed=7), 2 * SEQ_LEN, warmup_steps=2, schedule="cosine",
                           total_steps=4, weight_decay=0.1)
    extra = load_checkpoint(resumed, path)
    assert extra == {"data_pos": 2} and resumed.step == 2
    assert torch.equal(torch.rand(3), rng_after_save)
    losses += _run(resumed, range(extra["data_pos"], 4))

    assert losses == losses_straight
    w_a, w_b = _weights(straight), _weights(resumed)
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k


def test_keep_prunes_old(tmp_path):
    t = _make()
    for _ in range(3):
        _run(t, [t.step])
        save_checkpoint(t, tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_missing_and_corrupt_checkpoint_errors(tmp_path):
    t = _make()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(t, tmp_path / "step_00000009")
    bad = tmp_path / "step_00000001"
    bad.mkdir()
    (bad / "__0_0.distcp").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(t, bad)
    (bad / ".metadata").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(t, bad)


def test_stop_signal_sets_flag():
    stop = StopSignal()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    finally:
        stop.restore()
