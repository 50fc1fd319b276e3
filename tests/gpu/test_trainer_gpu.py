"""GPU: the trainer's forward + backward never waits on the device once per layer.

A device-to-host copy inside a layer (say a `.tolist()` of the attention metadata in the
backward) makes the host wait for the GPU there, so the host's launches stop overlapping the
GPU's work and every step pays both. Counted with torch's sync debug mode on a 2-layer and a
6-layer model: the number of syncs must not grow with depth; a step queued with
train_step_async makes none of ours at all. Also: the training attention's packed backward
against the cache path it replaced, at Qwen3-0.6B's head shape.

Run on a CUDA machine:  pytest -q tests/gpu/test_trainer_gpu.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.parallel import ParallelConfig  # noqa: E402
from miles_fsdp.train.draft import DraftConfig  # noqa: E402
from miles_fsdp.train.loss import sft_loss  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.packing import TrainSeq, pack, pinned  # noqa: E402
from miles_fsdp.train.scoring import ScoringSpec  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402

HF = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=4096, hidden_size=128,
          intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
          max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)


def syncs_per_backward(layers: int, mode: str) -> list[str]:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(dict(HF, num_hidden_layers=layers)))
    model.init_weights(seed=0)
    trainer = Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-5), max_tokens_per_micro_batch=1024,
                                           parallel=ParallelConfig(param_dtype="auto")))
    g = torch.Generator().manual_seed(0)
    seqs = [TrainSeq(torch.randint(0, 4096, (n,), generator=g).tolist(), [0] * 8 + [1] * (n - 8)) for n in (300, 200, 100)]
    spec = ScoringSpec(kernel_mode=mode)
    trainer.train_step(trainer.pack(seqs), sft_loss, spec)  # warm: Triton compiles, caches fill
    mbs = trainer.pack(seqs)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.backward(mbs, sft_loss, spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def ours(sites: list[str]) -> list[str]:
    return [s for s in sites if "miles_fsdp" in s or "miles_kernels" in s]


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_no_host_sync_per_layer(mode):
    shallow, deep = syncs_per_backward(2, mode), syncs_per_backward(6, mode)
    assert len(ours(deep)) == len(ours(shallow)), (
        f"{mode}: our syncs grow with depth: 2 layers {ours(shallow)}, 6 layers {ours(deep)} "
        f"(all syncs, torch's included: {len(shallow)} vs {len(deep)})")


def packed_case(lens: list[int], H: int, K: int, D: int, seed: int):
    """(meta, slots, pages, [q, k, v] leaves, output grad): packed bf16 sequences of `lens`."""
    import miles_kernels as mk

    g = torch.Generator(device="cuda").manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    meta, slot, pages = mk.varlen_meta(cu, mk.ATTN_BLOCK, "cuda")
    T = int(cu[-1])
    leaves = [torch.randn(T, n, D, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
              for n in (H, K, K)]
    return meta, slot, pages, leaves, torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("bwd", ["triton", "flash"])
@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_kv_attention_packed_path_at_real_shape(mode, bwd, monkeypatch):
    """The training attention (mk.kv_attention on packed sequences: backward from the packed
    K/V in our Triton kernels (MILES_ATTN_BWD=triton, the default) or one flash varlen call;
    with flash fast mode's forward is flash's too) against the cache path it replaced
    (differentiable write_kv + attention), Qwen3-0.6B heads, bf16, 4,096 tokens in sequences
    of 2,500 / 1 / 1,595: our forward the same output bits, grads within bf16 rounding."""
    import dataclasses

    import miles_kernels as mk
    from miles_kernels import _train_attention as ops

    monkeypatch.setattr(ops, "ATTN_BWD", bwd)
    monkeypatch.setattr(ops, "_LSE_STATE", {})
    H, K, D = 16, 8, 128
    meta, slot, pages, leaves, g_out = packed_case([2500, 1, 1595], H, K, D, seed=0)
    outs, grads = [], []
    with mk.use_mode(mode):
        for m in (dataclasses.replace(meta, packed=False), meta):
            kc = torch.zeros(pages, mk.ATTN_BLOCK, K, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.zeros_like(kc)
            o = mk.kv_attention(*leaves, kc, vc, m, slot, D**-0.5)
            outs.append(o.detach())
            grads.append(torch.autograd.grad(o, leaves, g_out))
    if bwd == "flash":
        # the packed backward is flash's one varlen call here, and it did not fail over to SDPA
        assert ops._flash_varlen_ok(*leaves) and not ops._FLASH_FAILED, ops._FLASH_FAILED
        if mode == "invariant":  # and it started from our forward's output and LSE (no flash forward)
            assert "ok" in ops._LSE_STATE, "the forward's LSE did not match flash's: the backward recomputes"
    else:
        assert ops._triton_bwd_ok(*leaves) and not ops._LSE_STATE  # no flash backward ran, nothing checked
    if mode == "invariant" or bwd == "triton":  # our forward on both paths (fast mode too, with our backward)
        with torch.no_grad(), mk.use_mode("invariant"):
            kc = torch.zeros(pages, mk.ATTN_BLOCK, K, D, device="cuda", dtype=torch.bfloat16)
            want = mk.kv_attention(*leaves, kc, torch.zeros_like(kc), meta, slot, D**-0.5)
        assert torch.equal(outs[1], want)
        if mode == "invariant":
            assert torch.equal(outs[0], outs[1])
    else:  # fast mode's packed forward is flash's, the cache path's SDPA's own pick
        assert (outs[0].double() - outs[1].double()).abs().max() <= 2e-2 * outs[0].double().abs().max()
    for a, b in zip(*grads):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 2e-2 * b.double().abs().max().item(), err


def test_packed_backward_from_our_lse_matches_flash_recompute(monkeypatch):
    """Invariant training attention, MILES_ATTN_BWD=flash: the backward from our forward's
    output and LSE gives the grads the flash-recompute backward gives, within bf16 rounding
    (4,096 tokens, Qwen3 heads)."""
    import miles_kernels as mk
    from miles_kernels import _train_attention as ops

    monkeypatch.setattr(ops, "ATTN_BWD", "flash")
    H, K, D = 16, 8, 128
    meta, slot, pages, leaves, g_out = packed_case([3000, 1096], H, K, D, seed=3)
    grads = []
    with mk.use_mode("invariant"):
        for state in ({"off": True}, {}):
            monkeypatch.setattr(ops, "_LSE_STATE", state)
            kc = torch.zeros(pages, mk.ATTN_BLOCK, K, D, device="cuda", dtype=torch.bfloat16)
            o = mk.kv_attention(*leaves, kc, torch.zeros_like(kc), meta, slot, D**-0.5)
            grads.append(torch.autograd.grad(o, leaves, g_out))
    assert "ok" in ops._LSE_STATE
    for a, b, name in zip(*grads, "qkv"):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 1e-2 * b.double().abs().max().item(), f"d{name}: {err}"


def _four_layers(graphs: bool, draft: bool = False) -> Trainer:
    """A 4-layer trainer (with an MTP draft trained beside it where `draft`)."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(dict(HF, num_hidden_layers=4, num_nextn_predict_layers=int(draft))))
    model.init_weights(seed=0)
    return Trainer(model, TrainerConfig(optim=OptimConfig(lr=1e-4), max_tokens_per_micro_batch=512,
                                        cuda_graphs=graphs, parallel=ParallelConfig(param_dtype="auto")),
                   draft=DraftConfig() if draft else None)


def _three_seqs() -> list[TrainSeq]:
    """Three sequences (300, 200, 100 tokens) that pack into a 500- and a 100-token micro-batch."""
    g = torch.Generator().manual_seed(0)
    return [TrainSeq(torch.randint(0, 4096, (n,), generator=g).tolist(), [0] * 8 + [1] * (n - 8))
            for n in (300, 200, 100)]


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_cuda_graphs_train_like_the_eager_trunk(mode):
    """TrainerConfig.cuda_graphs: the trunk's forward and backward replayed from CUDA graphs
    (two buckets: 500 tokens -> 512, 100 -> 256; captured, no fallback) trains like the eager
    trunk: invariant mode the same loss bits at the first step (the padded rows never reach the
    real ones), weights and later losses within rounding (the weight grads' sums differ)."""
    seqs, spec = _three_seqs(), ScoringSpec(kernel_mode=mode)
    eager, graphed = _four_layers(False), _four_layers(True)
    for step in range(3):
        a = eager.train_step(eager.pack(seqs), sft_loss, spec)
        b = graphed.train_step(graphed.pack(seqs), sft_loss, spec)
        if step == 0 and mode == "invariant":
            assert a["train/loss"] == b["train/loss"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3), step
        assert b["perf/reserved_gib"] >= b["perf/peak_mem_gib"] > 0  # the reserve holds the graphs' pool
    assert not graphed.graphs.failed, graphed.graphs.failed
    assert sorted(k[1] for k in graphed.graphs.buckets) == [256, 512]
    assert all(bk.fwd is not None for bk in graphed.graphs.buckets.values())
    assert len({id(bk.grads) for bk in graphed.graphs.buckets.values()}) == 1  # one set of grad outputs
    for (k, x), y in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("graphs,draft", [(False, False), (True, False), (True, True)])
def test_queued_steps_never_wait_and_train_the_same_bits(graphs, draft):
    """Trainer.train_step_async (train/pending.py): once warm, queuing a step makes no host sync
    of ours (sync debug mode), and three steps queued, their metrics read after the last, give
    train_step's losses, grad norms (the draft's too) and weights bit for bit."""
    seqs = _three_seqs()
    waited, queued = _four_layers(graphs, draft), _four_layers(graphs, draft)
    want = [waited.train_step(waited.pack(seqs), sft_loss) for _ in range(4)]
    first = queued.train_step(queued.pack(seqs), sft_loss)  # warm: compiles, graph captures
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = [queued.train_step_async(queued.pack(seqs), sft_loss) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = ours([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])
    assert not sites, f"queuing a step waited on the device at {sites}"
    got = [first] + [p.result() for p in pending]
    for step, (a, b) in enumerate(zip(want, got)):
        keys = ("train/loss", "train/grad_norm", "train/tokens", "train/skipped_step")
        for k in keys + (("draft/loss", "draft/acc", "draft/grad_norm") if draft else ()):
            assert a[k] == b[k], f"step {step}: {k} {a[k]} vs {b[k]}"
        assert b["time/train_step_s"] > 0 and b["perf/peak_mem_gib"] > 0
    assert not graphs or not queued.graphs.failed, queued.graphs.failed
    for (k, x), y in zip(waited.model.state_dict().items(), queued.model.state_dict().values()):
        assert torch.equal(x, y), k


def test_pinned_micro_batch_keeps_values():
    """packing.pinned: per-token tensors pinned (non-blocking copies to the GPU), the same
    values; cu_seqlens (read on the host) and the other fields as they were."""
    seqs = [TrainSeq(list(range(3, 40)), [0] * 5 + [1] * 32), TrainSeq(list(range(7, 20)))]
    mb = pack(seqs, 64)[0]
    mb.weight_T = torch.rand(mb.num_tokens)
    mb.fields["adv"] = torch.randn(mb.num_tokens)
    p = pinned(mb)
    for name in ("ids_T", "pos_T", "targets_T", "mask_T", "weight_T"):
        assert getattr(p, name).is_pinned() and torch.equal(getattr(p, name), getattr(mb, name)), name
    assert p.fields["adv"].is_pinned() and torch.equal(p.fields["adv"], mb.fields["adv"])
    assert p.cu_seqlens is mb.cu_seqlens and p.seq_index == mb.seq_index and p.dummy == mb.dummy
    assert torch.equal(p.mask_T.to("cuda", non_blocking=True).cpu(), mb.mask_T)
