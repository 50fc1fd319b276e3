"""Weight sync gives exactly param.to(bf16) under the plain names; the reference policy is
frozen and matches the trainer before any step; AC changes neither names nor numbers."""

import pytest
import torch
from common import SEQ_LEN, global_batch, make_trainer, pg_loss
from tiny_model import TinyLM

from miles_fsdp.models import load_model
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.reference import ReferencePolicy
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import Trainer, TrainerConfig
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.weight_sync import iter_weight_buckets, sync_weights


def _seqs():
    g = torch.Generator().manual_seed(0)
    return [TrainSeq(torch.randint(0, 300, (n,), generator=g).tolist()) for n in (9, 17, 5)]


@pytest.mark.parametrize("dtype,ref_offload", [("auto", True), ("bf16", True), ("bf16", False)])
def test_weight_sync_and_reference(ckpt, dtype, ref_offload):
    """One rank: the trainer runs without FSDP (bf16: on shadows of its fp32 parameters), the
    reference under FSDP (ref_offload) or without: the same scores either way."""
    plain = load_model(ckpt)
    want = {k: v.to(torch.bfloat16) for k, v in plain.state_dict().items()}
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-2), max_tokens_per_micro_batch=32,
                        parallel=ParallelConfig(activation_checkpointing=True, param_dtype=dtype))
    trainer = Trainer(load_model(ckpt), cfg)
    ref = ReferencePolicy(load_model(ckpt), trainer, cpu_offload=ref_offload)

    buckets = list(iter_weight_buckets(trainer.model, torch.bfloat16, bucket_bytes=64 * 1024))
    assert len(buckets) > 1
    got = {k: v for b in buckets for k, v in b.items()}
    assert got.keys() == want.keys()  # no checkpoint-wrapper or FSDP prefixes
    assert all(torch.equal(got[k], want[k]) for k in want)

    mbs = trainer.pack(_seqs())
    spec = ScoringSpec(temperature=0.7, top_k=20, top_p=0.9)  # the reference scores as the policy does
    logp_before = trainer.forward_logprobs(mbs, spec)
    ref_logp = ref.ref_logprobs(mbs, spec)  # the trained positions only, 0 at the others
    trained = [mb.mask_T > 0 for mb in mbs]
    assert all(torch.equal(a[m], b[m]) and not b[~m].any() for a, b, m in zip(logp_before, ref_logp, trained))
    assert all(s.numel() == 0 for s in ref.local.shadows)  # no bf16 copy held between uses
    plain_logp = ref.ref_logprobs(mbs, ScoringSpec())
    assert not all(torch.equal(a, b) for a, b in zip(plain_logp, ref_logp))

    trainer.train_step(mbs, sft_loss)
    pushed = {}
    metrics = sync_weights(trainer.model, pushed.update, torch.bfloat16)
    assert metrics["time/weight_sync_s"] >= 0 and metrics["weight_sync/buckets"] == 1
    assert not torch.equal(pushed["embed.weight"], want["embed.weight"])  # the update reached the engine
    assert all(torch.equal(a, b) for a, b in zip(ref.ref_logprobs(mbs, spec), ref_logp))  # reference stays frozen
    assert not all(torch.equal(a, b) for a, b in zip(trainer.forward_logprobs(mbs, spec), logp_before))


def test_out_of_memory_in_a_train_step_names_the_settings(monkeypatch):
    trainer = make_trainer(TinyLM(), 2 * SEQ_LEN)
    mbs = trainer.pack(global_batch())

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(trainer, "_forward", oom)
    with pytest.raises(torch.OutOfMemoryError, match=rf"train step \({len(mbs)} micro-batches, the largest \d+ tokens\) "
                       rf"ran out of memory; lower trainer.max_tokens_per_micro_batch \(now {2 * SEQ_LEN}\).*"
                       r"activation_checkpointing.*kv_memory_fraction.*Allocator: CUDA out of memory"):
        trainer.train_step(mbs, pg_loss)


def test_scoring_trained_positions_only_gives_their_bits(ckpt):
    """The trainer scores only trained targets (the lm_head skips the prompt): the same bits
    there as scoring every position, 0 elsewhere, with top-k/top-p too."""
    from miles_fsdp.train.packing import pack
    from miles_fsdp.train.trainer import packed_logprobs

    model = load_model(ckpt)
    g = torch.Generator().manual_seed(3)
    seqs = [TrainSeq(torch.randint(0, 300, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
            for n in (9, 17, 6)]
    [mb] = pack(seqs, 64)
    spec = ScoringSpec(temperature=0.8, top_k=30, top_p=0.9)
    with torch.no_grad():
        full, ent = packed_logprobs(model, mb, torch.device("cpu"), spec, entropy=True)
        part, ent_p = packed_logprobs(model, mb, torch.device("cpu"), spec, entropy=True, trained_only=True)
    m = mb.mask_T > 0
    assert torch.equal(part[m], full[m]) and torch.equal(ent_p[m], ent[m])
    assert not part[~m].any() and not ent_p[~m].any() and (~m).sum() > 5
