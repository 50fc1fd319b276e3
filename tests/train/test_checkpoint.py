"""DCP checkpoints: 4 steps straight == 2 steps + save + fresh process state + resume + 2."""

import os
import signal

import pytest
import torch

from common import SEQ_LEN, global_batch, make_trainer, pg_loss
from tiny_model import TinyLM

from miles_fsdp.train.checkpoint import (CheckpointError, StopSignal, latest_checkpoint, load_checkpoint,
                                         save_checkpoint)


def _batch(step: int):
    return global_batch(seed=step)  # a different batch each step, fixed by the step index


def _run(trainer, steps):
    return [trainer.train_step(trainer.pack(_batch(s)), pg_loss)["train/loss"] for s in steps]


def _weights(trainer):
    state = trainer.model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in state.items()}


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


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import logging

    from miles_fsdp.train.checkpoint import load_newest_good

    trainer = _make()
    _run(trainer, range(1))
    save_checkpoint(trainer, tmp_path, extra={"at": 1})
    w1 = _weights(trainer)
    _run(trainer, range(1, 2))
    newest = save_checkpoint(trainer, tmp_path, extra={"at": 2})
    for f in newest.glob("*.distcp"):  # a torn write: every data file cut short
        f.write_bytes(f.read_bytes()[:100])

    resumed = _make()
    with caplog.at_level(logging.WARNING):
        path, extra = load_newest_good(resumed, tmp_path)
    assert path.name == "step_00000001" and extra == {"at": 1} and resumed.step == 1
    assert "step_00000002: cannot load checkpoint" in caplog.text and "resumed from step_00000001" in caplog.text
    assert newest.is_dir()  # the broken one is kept for inspection
    w = _weights(resumed)
    assert all(torch.equal(w[k], w1[k]) for k in w1)
    with pytest.raises(CheckpointError, match=r"step_00000002: cannot load checkpoint .*incomplete or corrupt"):
        load_checkpoint(_make(), newest)
    for f in (tmp_path / "step_00000001").glob("*.distcp"):
        f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint under .* loads"):
        load_newest_good(_make(), tmp_path)
