"""ParallelConfig.fsdp_units: one FSDP unit per block, one for the whole model, or no FSDP at
all on one rank ("none": fp32 masters and compute-dtype shadows, parallel/local.py) train the
same bits (the unit only decides when parameters are gathered and cast), the draft included;
the default takes "none" on one rank; bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.checkpoint import load_checkpoint, save_checkpoint
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64,
          intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
          num_nextn_predict_layers=1)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _seqs() -> list[TrainSeq]:
    g = torch.Generator().manual_seed(1)
    return [TrainSeq(torch.randint(0, 256, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4)) for n in (40, 33, 57)]


def _trainer(units: str, ac: bool = False, dtype: str = "auto") -> Trainer:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(HF))
    model.init_weights(seed=0)
    parallel = ParallelConfig(fsdp_units=units, activation_checkpointing=ac, param_dtype=dtype)
    return Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=96,
                                        parallel=parallel), draft=DraftConfig())


def _train(units: str, defer: bool = True, ac: bool = False,
           dtype: str = "auto") -> tuple[Trainer, dict[str, torch.Tensor], list[dict]]:
    trainer = _trainer(units, ac, dtype)
    # one rank, no offload: FSDP defers its reduce to the step's last micro-batch; "none" has no FSDP
    assert trainer.defer_grad_sync == (units != "none") and trainer.defer_reshard == (units == "model")
    if units != "none":
        trainer.defer_grad_sync, trainer.defer_reshard = defer, defer and units == "model"
    seqs = _seqs()
    assert len(trainer.pack(seqs)) == 2
    metrics = []
    for _ in range(3):  # as the RL loop does: a no-grad scoring forward, then the train step
        metrics.append({"logp": [t.clone() for t in trainer.forward_logprobs(trainer.pack(seqs))],
                        **trainer.train_step(trainer.pack(seqs), sft_loss)})
    metrics.append({"logp": trainer.forward_logprobs(trainer.pack(seqs))})  # after the last update
    state = {k: _full(v) for k, v in trainer.model.state_dict().items()}
    return trainer, state, metrics


def _next_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The grads a 4th step would apply (accumulated over its 2 micro-batches, the draft's too)."""
    trainer.backward(trainer.pack(_seqs()), sft_loss)
    return {n: _full(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}


def _same_metrics(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "logp" and not k.startswith(("perf/", "time/"))} == \
        {k: v for k, v in b.items() if k != "logp" and not k.startswith(("perf/", "time/"))}


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
        assert _same_metrics(a, b)


def test_activation_checkpointing_trains_the_same_bits():
    """Recomputing each block in backward (its attention rewrites the layers' shared scratch KV
    cache before reading it) gives the same weights and scores as keeping the activations."""
    _, plain, m_plain = _train("model")
    _, ac, m_ac = _train("model", ac=True)
    for k in plain:
        assert torch.equal(plain[k], ac[k]), f"{k}: activation checkpointing changed the weights"
    for a, b in zip(m_plain, m_ac):
        assert all(torch.equal(x, y) for x, y in zip(a["logp"], b["logp"]))


@pytest.mark.parametrize("dtype,ac", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_no_fsdp_trains_the_same_bits_as_the_model_unit(dtype, ac):
    """fsdp_units="none" vs "model": the same grads (2 micro-batches a step, the draft's
    included), weights after 3 steps, scores before and after each update, and metrics
    (loss, grad_norm, draft/loss); bf16: the forward and backward run on bf16 shadows and the
    grads accumulate in fp32, as FSDP's all-gather cast and unsynced accumulation do."""
    t_none, none, m_none = _train("none", ac=ac, dtype=dtype)
    t_model, model, m_model = _train("model", ac=ac, dtype=dtype)
    assert not isinstance(t_none.model, FSDPModule) and not hasattr(t_none.model, "full_tensor")
    assert bool(t_none.local.shadows) == (dtype == "bf16")
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in t_none.model.parameters())
    assert none.keys() == model.keys() and any(k.startswith("mtp.") for k in none)
    for k in none:
        assert torch.equal(none[k], model[k]), f"{k} differs between fsdp_units='none' and 'model'"
    for step, (a, b) in enumerate(zip(m_none, m_model)):
        assert all(torch.equal(x, y) for x, y in zip(a["logp"], b["logp"])), f"logprobs before update {step}"
        assert _same_metrics(a, b), f"metrics of step {step}"
    grads_none, grads_model = _next_grads(t_none), _next_grads(t_model)
    assert grads_none.keys() == grads_model.keys() and any(k.startswith("mtp.") for k in grads_none)
    for k in grads_none:
        assert grads_none[k].dtype == torch.float32 and torch.equal(grads_none[k], grads_model[k]), k
    assert "draft/loss" in m_none[0] and not torch.equal(m_none[0]["logp"][0], m_none[-1]["logp"][0])


def test_no_fsdp_draft_alone_trains_the_same_bits():
    """train_draft_step (trunk forward without grad, the draft's own AdamW) on bf16 shadows."""
    out = {}
    for units in ("none", "model"):
        trainer = _trainer(units, dtype="bf16")
        metrics = [trainer.train_draft_step(trainer.pack(_seqs())) for _ in range(2)]
        out[units] = ([{k: v for k, v in m.items() if k.startswith("draft/")} for m in metrics],
                      {k: _full(v) for k, v in trainer.model.mtp.state_dict().items()})
    assert out["none"][0] == out["model"][0]
    for k, v in out["none"][1].items():
        assert torch.equal(v, out["model"][1][k]), k


@pytest.mark.parametrize("units", ["none", "model"])
def test_failed_step_drops_its_partial_grads(units):
    """The loss function raising at the second micro-batch: the failed step's partial grads
    are dropped (none on any parameter; without FSDP none half-accumulated and the modules
    hold their fp32 masters again; under FSDP none in its deferred-sync sums), and the next
    step trains as on a fresh trainer (after which, without FSDP, the shadows are freed)."""
    def failing_loss(logp_T, ent_T, mb):
        calls.append(mb)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return sft_loss(logp_T, ent_T, mb)

    calls = []
    trainer, fresh = _trainer(units, dtype="bf16"), _trainer(units, dtype="bf16")
    before = trainer.forward_logprobs(trainer.pack(_seqs()))
    with pytest.raises(RuntimeError, match="loss failed"):
        trainer.train_step(trainer.pack(_seqs()), failing_loss)
    assert len(calls) == 2 and all(p.grad is None for p in trainer.model.parameters())
    if units == "none":
        local = trainer.local
        assert all(p is m for p, m in zip(trainer.model.parameters(), local.masters, strict=True))
        assert all(m.dtype == torch.float32 for m in local.masters)
        assert all(s.grad is None for s in local.shadows) and all(a is None for a in local._accs)
    assert all(torch.equal(x, y) for x, y in zip(before, trainer.forward_logprobs(trainer.pack(_seqs()))))
    m_a = trainer.train_step(trainer.pack(_seqs()), sft_loss)
    m_b = fresh.train_step(fresh.pack(_seqs()), sft_loss)
    assert _same_metrics(m_a, m_b)
    if units == "none":  # after the step the stale bf16 copies are freed, until the next forward
        assert all(s.numel() == 0 for s in trainer.local.shadows) and trainer.local.shadows
    for (k, a), b in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values()):
        a, b = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (a, b))
        assert torch.equal(a, b), k


@pytest.mark.parametrize("saved,loaded", [("model", "none"), ("none", "model")])
def test_checkpoint_resumes_across_units(saved, loaded, tmp_path):
    """A checkpoint saved under one unit loads under the other (DCP state dicts of DTensors and
    plain tensors interoperate) and training goes on with the same bits; the load reaches
    the bf16 shadows of a trainer that has run before (it bumps the masters' _version)."""
    seqs = _seqs()
    first = _trainer(saved, dtype="bf16")
    first.train_step(first.pack(seqs), sft_loss)
    path = save_checkpoint(first, tmp_path)
    resumed = _trainer(loaded, dtype="bf16")
    resumed.forward_logprobs(resumed.pack(seqs))  # shadows of the initial weights, stale after the load
    load_checkpoint(resumed, path)
    assert resumed.step == 1
    for x, y in zip(first.forward_logprobs(first.pack(seqs)), resumed.forward_logprobs(resumed.pack(seqs))):
        assert torch.equal(x, y)
    assert _same_metrics(first.train_step(first.pack(seqs), sft_loss), resumed.train_step(resumed.pack(seqs), sft_loss))
    a, b = first.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(_full(a[k]), _full(b[k])), k


def test_auto_units_and_refusals():
    assert ParallelConfig().units(1, 1) == "none"
    assert ParallelConfig().units(2, 1) == "model"  # HSDP, one rank per replica
    assert ParallelConfig().units(2, 2) == "block"
    assert ParallelConfig(cpu_offload=True).units(1, 1) == "block"
    assert ParallelConfig(fsdp_units="block").units(1, 1) == "block"
    assert ParallelConfig(fsdp_units="model").units(4, 4) == "model"
    assert not isinstance(_trainer("auto").model, FSDPModule)
    with pytest.raises(ValueError, match="fsdp_units='model'.*cpu_offload"):
        ParallelConfig(fsdp_units="model", cpu_offload=True)
    with pytest.raises(ValueError, match="fsdp_units='none'.*cpu_offload"):
        ParallelConfig(fsdp_units="none", cpu_offload=True)
    with pytest.raises(ValueError, match="fsdp_units='none'.*replicate=2"):
        ParallelConfig(fsdp_units="none", replicate=2)
    with pytest.raises(ValueError, match="fsdp_units='none'.*this run has 2"):
        ParallelConfig(fsdp_units="none").units(2, 2)
    with pytest.raises(ValueError, match="fsdp_units='layer'"):
        ParallelConfig(fsdp_units="layer")
