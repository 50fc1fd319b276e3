"""Trainer.train_step_async (train/pending.py): steps queued without waiting give the metrics and
the weights train_step gives, whenever and in whatever order the metrics are read, with the
draft too, and train_draft_step_async train_draft_step's; two ranks reading their metrics at
different times (tests/train/dist_worker.py); OneStepBehind hands each step over once the next
is queued."""

from __future__ import annotations

import pytest
import torch

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.pending import OneStepBehind, PendingMetrics, StepTimer
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=128, hidden_size=32,
          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
          max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)
# the clock's and the process's, not the step's values
MEASURED = ("time/train_step_s", "perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gib", "perf/reserved_gib")


def _trainer(draft: bool, train_trunk: bool = True) -> Trainer:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=64)
    return Trainer(model, cfg, draft=DraftConfig(optim=OptimConfig(lr=1e-3)) if draft else None,
                   train_trunk=train_trunk)


def _batches(step: int) -> list[TrainSeq]:
    g = torch.Generator().manual_seed(step)
    return [TrainSeq(torch.randint(0, 128, (n,), generator=g).tolist(), [0] * 3 + [1] * (n - 3)) for n in (30, 21, 40)]


def _without_clock(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in MEASURED}


@pytest.mark.parametrize("draft", [False, True])
def test_async_steps_equal_waited_steps(draft):
    waited, queued = _trainer(draft), _trainer(draft)
    want = [waited.train_step(waited.pack(_batches(s)), sft_loss) for s in range(3)]
    pending = [queued.train_step_async(queued.pack(_batches(s)), sft_loss) for s in range(3)]
    assert all(isinstance(p, PendingMetrics) and p.ready() for p in pending)  # CPU: done as called
    got = [pending[i].result() for i in (2, 0, 1)]  # read out of order, after every step was queued
    got = [got[1], got[2], got[0]]
    for s in range(3):
        assert _without_clock(got[s]) == _without_clock(want[s]), f"step {s}"
        assert got[s].keys() == want[s].keys()
        assert got[s]["time/train_step_s"] > 0 and got[s]["perf/tokens_per_s"] > 0
        assert pending[s].result() is got[s]  # built once
    assert ("draft/loss" in got[0]) == draft and want[0]["train/loss"] != want[2]["train/loss"]
    assert queued.step == waited.step == 3
    for (name, p), q in zip(waited.model.named_parameters(), queued.model.parameters()):
        assert torch.equal(p, q), name


def test_draft_steps_queued_equal_waited():
    waited, queued = _trainer(True, train_trunk=False), _trainer(True, train_trunk=False)
    want = [waited.train_draft_step(waited.pack(_batches(s))) for s in range(2)]
    pending = [queued.train_draft_step_async(queued.pack(_batches(s))) for s in range(2)]
    got = [p.result() for p in pending]
    for s in range(2):
        assert _without_clock(got[s]) == _without_clock(want[s]) and got[s].keys() == want[s].keys(), f"step {s}"
    assert "draft/grad_norm" in got[0] and got[0]["draft/loss"] != got[1]["draft/loss"]
    for (name, p), q in zip(waited.model.named_parameters(), queued.model.parameters()):
        assert torch.equal(p, q), name


def test_one_step_behind_hands_each_step_over_once_the_next_is_queued():
    class Log:
        def __init__(self):
            self.rows = []

        def log(self, step, m):
            self.rows.append(("log", step, m["x"]))

        def update(self, step, m):
            self.rows.append(("bar", step, m["x"]))

    timer, history, sink = StepTimer(torch.device("cpu")), [], Log()
    steps = OneStepBehind(history, sink, sink)
    step = lambda x: PendingMetrics(torch.tensor([x], dtype=torch.float64), lambda v, dt: {"x": v[0]},  # noqa: E731
                                    timer, timer.start())
    steps.push(1, step(1.0))
    assert history == [] and sink.rows == []  # held until the next is queued
    steps.push(2, step(2.0))
    assert history == [{"x": 1.0}] and sink.rows == [("log", 1, 1.0), ("bar", 1, 1.0)]
    steps.flush()
    steps.flush()  # nothing held: nothing more
    assert [h["x"] for h in history] == [1.0, 2.0] and sink.rows[2:] == [("log", 2, 2.0), ("bar", 2, 2.0)]


def test_metrics_are_read_from_the_step_they_belong_to():
    """A step's values are taken when it is queued: later steps never change them."""
    trainer = _trainer(False)
    first = trainer.train_step_async(trainer.pack(_batches(0)), sft_loss)
    second = trainer.train_step_async(trainer.pack(_batches(1)), sft_loss)
    alone = _trainer(False)
    want = alone.train_step(alone.pack(_batches(0)), sft_loss)
    assert _without_clock(first.result()) == _without_clock(want)
    assert second.result()["train/loss"] != first.result()["train/loss"]


def test_pending_on_cpu_times_with_the_host():
    timer = StepTimer(torch.device("cpu"))
    p = PendingMetrics(torch.tensor([1.0, 2.0], dtype=torch.float64), lambda v, dt: {"a": v[0] + v[1], "dt": dt},
                       timer, timer.start())
    assert p.ready() and p.result()["a"] == 3.0 and p.result()["dt"] >= 0
