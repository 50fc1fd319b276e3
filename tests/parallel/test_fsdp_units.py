"""ParallelConfig.fsdp_units: one FSDP unit per block or one for the whole model trains the
same bits (the unit only decides when parameters are gathered), the draft included; the
default takes the whole-model unit where nothing is sharded; bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64,
          intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)


def _train(units: str, defer: bool = True, ac: bool = False) -> tuple[Trainer, dict[str, torch.Tensor], list[dict]]:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    parallel = ParallelConfig(fsdp_units=units, activation_checkpointing=ac)
    trainer = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=96,
                                           parallel=parallel), draft=DraftConfig())
    assert trainer.defer_grad_sync and trainer.defer_reshard == (units == "model")  # one rank, no offload
    trainer.defer_grad_sync, trainer.defer_reshard = defer, defer and units == "model"
    g = torch.Generator().manual_seed(1)
    seqs = [TrainSeq(torch.randint(0, 256, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4)) for n in (40, 33, 57)]
    metrics = []
    for _ in range(3):  # as the RL loop does: a no-grad scoring forward, then the train step
        metrics.append({"logp": [t.clone() for t in trainer.forward_logprobs(trainer.pack(seqs))],
                        **trainer.train_step(trainer.pack(seqs), sft_loss)})
    metrics.append({"logp": trainer.forward_logprobs(trainer.pack(seqs))})  # after the last update
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in trainer.model.state_dict().items()}
    return trainer, state, metrics


def test_block_and_model_units_train_the_same_bits():
    t_block, block, m_block = _train("block")
    t_model, model, m_model = _train("model")
    assert isinstance(t_block.model.layers[0], FSDPModule) and isinstance(t_block.model.mtp[0], FSDPModule)
    assert not isinstance(t_model.model.layers[0], FSDPModule) and isinstance(t_model.model, FSDPModule)
    assert block.keys() == model.keys() and any(k.startswith("mtp.") for k in block)
    for k in block:
        assert torch.equal(block[k], model[k]), f"{k} differs between fsdp_units='block' and 'model'"
    for step, (a, b) in enumerate(zip(m_block, m_model)):  # scoring never reads stale gathered params
        assert all(torch.equal(x, y) for x, y in zip(a["logp"], b["logp"])), f"logprobs before update {step}"
        assert a.get("train/loss") == b.get("train/loss") and a.get("draft/loss") == b.get("draft/loss")
    assert not torch.equal(m_model[0]["logp"][0], m_model[-1]["logp"][0]), "the updates must show in the scores"


@pytest.mark.parametrize("units", ["block", "model"])
def test_deferred_grad_sync_trains_the_same_bits(units, monkeypatch):
    """One rank: FSDP reduces once, after the last micro-batch (2 per step here), not after each
    (and, one unit for the whole model, reshards then too); the grads, so the weights, the
    scores and the metrics, are the same bits."""
    calls = []
    real = FSDPModule.set_requires_gradient_sync
    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync",
                        lambda self, on, **kw: (calls.append(on), real(self, on, **kw))[1])
    _, deferred, m_deferred = _train(units)
    assert calls[:3] == [False, True, True]  # per step: first micro-batch, last, the reset after
    calls.clear()
    _, each, m_each = _train(units, defer=False)
    assert not calls
    for k in each:
        assert torch.equal(each[k], deferred[k]), f"{k}: deferred grad sync changed the weights"
    for a, b in zip(m_each, m_deferred):
        assert all(torch.equal(x, y) for x, y in zip(a["logp"], b["logp"]))
        assert {k: v for k, v in a.items() if k != "logp" and not k.startswith(("perf/", "time/"))} == \
            {k: v for k, v in b.items() if k != "logp" and not k.startswith(("perf/", "time/"))}


def test_activation_checkpointing_trains_the_same_bits():
    """Recomputing each block in backward (its attention rewrites the layers' shared scratch KV
    cache before reading it) gives the same weights and scores as keeping the activations."""
    _, plain, m_plain = _train("model")
    _, ac, m_ac = _train("model", ac=True)
    for k in plain:
        assert torch.equal(plain[k], ac[k]), f"{k}: activation checkpointing changed the weights"
    for a, b in zip(m_plain, m_ac):
        assert all(torch.equal(x, y) for x, y in zip(a["logp"], b["logp"]))


def test_auto_units_and_refusals():
    assert ParallelConfig().whole_model_unit(shard_size=1)
    assert not ParallelConfig().whole_model_unit(shard_size=2)
    assert not ParallelConfig(cpu_offload=True).whole_model_unit(shard_size=1)
    assert not ParallelConfig(fsdp_units="block").whole_model_unit(shard_size=1)
    assert ParallelConfig(fsdp_units="model").whole_model_unit(shard_size=4)
    with pytest.raises(ValueError, match="fsdp_units='model'.*cpu_offload"):
        ParallelConfig(fsdp_units="model", cpu_offload=True)
    with pytest.raises(ValueError, match="fsdp_units='layer'"):
        ParallelConfig(fsdp_units="layer")
