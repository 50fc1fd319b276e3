"""Scheduler, block manager and prefix cache, driven through the Engine with a paged mock model."""

from __future__ import annotations

import random

import miles_kernels as mk
import pytest
import torch

from miles_fsdp.engine import FinishReason, Request, SamplingParams
from miles_fsdp.engine import radix_cache
from miles_fsdp.engine.block_manager import BlockManager
from miles_fsdp.engine.sequence import Sequence

from conftest import mock_engine


def random_requests(n_req: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    base = [rng.randrange(48) for _ in range(40)]
    reqs = []
    for i in range(n_req):
        if i % 3 == 0:  # shared prefix with others
            prompt = base[: rng.randrange(17, 40)] + [rng.randrange(48)]
        else:
            prompt = [rng.randrange(48) for _ in range(rng.randrange(1, 50))]
        p = SamplingParams(n=rng.choice([1, 1, 2, 3]), max_new_tokens=rng.randrange(1, 30), seed=i,
                           temperature=rng.choice([0.0, 0.7, 1.0]), stop_token_ids=(5,))
        reqs.append(Request(prompt, p, request_id=f"r{i}"))
    return reqs


def check_against_reference(model, req: Request, res) -> None:
    toks = req.prompt_ids + res.token_ids
    for i, (t, lp) in enumerate(zip(res.token_ids, res.logprobs)):
        logits = model.reference_logits(toks[: len(req.prompt_ids) + i])
        temp = req.params.temperature or 1.0
        want, _ = mk.logprobs(logits, torch.tensor([t]), temp, top_k=req.params.top_k, top_p=req.params.top_p)
        assert lp.item() == want.item(), f"{req.request_id}: token {i} logprob differs from the cache-free reference"


def test_kv_pressure_loses_and_duplicates_nothing():
    reqs = random_requests(14, seed=0)
    roomy, _ = mock_engine(num_pages=128, max_num_seqs=64)
    want = roomy.generate(reqs)
    # 7 usable pages of 16 tokens; the longest sample needs 79 tokens (5 pages)
    tight, model = mock_engine(num_pages=8, max_num_seqs=6, max_prefill_tokens=32)
    got = tight.generate([Request(list(r.prompt_ids), r.params, r.request_id) for r in reqs])
    assert tight.stats()["num_preemptions"] > 0
    assert tight.stats()["num_free_pages"] == 7, "every page is returned once all samples finish"
    assert not tight.has_unfinished()
    for r, w, g in zip(reqs, want, got):
        assert len(g) == r.params.n and [x.sample_index for x in g] == list(range(r.params.n))
        for a, b in zip(w, g):
            assert a.token_ids == b.token_ids and torch.equal(a.logprobs, b.logprobs)
            assert 1 <= len(b.token_ids) <= r.params.max_new_tokens
            if b.finish_reason is FinishReason.STOP:
                assert b.token_ids[-1] == 5 and 5 not in b.token_ids[:-1]
            else:
                assert b.finish_reason is FinishReason.LENGTH and len(b.token_ids) == r.params.max_new_tokens
            check_against_reference(model, r, b)


def test_streamed_outputs_concatenate_to_results():
    eng, _ = mock_engine(num_pages=12, max_prefill_tokens=32)
    reqs = random_requests(6, seed=1)
    for r in reqs:
        eng.add_request(r)
    streams: dict = {}
    results: dict = {}
    while eng.has_unfinished():
        for out in eng.step():
            key = (out.request_id, out.sample_index)
            assert key not in results, "output after the sample finished"
            toks, lps = streams.setdefault(key, ([], []))
            toks += out.new_token_ids
            lps += out.new_logprobs
            if out.finished:
                results[key] = out.result
    assert len(results) == sum(r.params.n for r in reqs)
    for key, res in results.items():
        assert streams[key][0] == res.token_ids and streams[key][1] == res.logprobs.tolist()


def test_chunked_prefill_aligned_to_attn_block():
    eng, model = mock_engine(num_pages=32, max_prefill_tokens=40)  # budget not a multiple of the block
    seen = []
    orig = model.forward

    def spy(ids_T, pos_T, meta, slot_T, kv):
        cu = meta.cu_seqlens_q.tolist()
        for b, L in enumerate(meta.kv_lens.tolist()):
            q = cu[b + 1] - cu[b]
            seen.append((L - q, L))
        return orig(ids_T, pos_T, meta, slot_T, kv)

    model.forward = spy
    eng.generate([Request(list(range(1, 47)) * 2, SamplingParams(max_new_tokens=3, seed=0))])
    starts = [s for s, _ in seen if s < 92]
    assert len(starts) > 2, "a 92-token prompt with a 40-token budget must be chunked"
    assert all(s % mk.ATTN_BLOCK == 0 for s in starts)


def test_n_samples_share_prompt_pages():
    eng, model = mock_engine(num_pages=32)
    prompt = [random.Random(3).randrange(48) for _ in range(50)]  # 3 full pages + 2 tokens
    [samples] = eng.generate([Request(prompt, SamplingParams(n=4, max_new_tokens=4, seed=9))])
    assert samples[0].num_cached_prompt_tokens == 0
    assert [s.num_cached_prompt_tokens for s in samples[1:]] == [48, 48, 48]
    assert model.forward_tokens < 50 + 3 * (50 - 48) + 4 * 4 + 1
    # a repeated prompt hits too; distinct sample streams give distinct samples
    [again] = eng.generate([Request(prompt, SamplingParams(n=1, max_new_tokens=4, seed=9))])
    assert again[0].num_cached_prompt_tokens == 48
    assert again[0].token_ids == samples[0].token_ids
    assert len({tuple(s.token_ids) for s in samples}) > 1


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(Request(tokens, SamplingParams()), 0, 0, 0.0)


def test_block_manager_refcounts_and_eviction_order():
    bm = BlockManager(num_pages=6, page_size=4)
    a = _seq(list(range(10)))
    assert bm.admit(a, [], [], 10) and a.block_table == [1, 2, 3]
    a.num_computed = 10
    bm.register(a)  # 2 full pages indexed
    b = _seq(list(range(9)))
    pages, keys = bm.match(b)
    assert pages == [1, 2]
    assert bm.admit(b, pages, keys, 9) and b.block_table == [1, 2, 4] and b.num_computed == 8
    assert bm.ref[1] == bm.ref[2] == 2
    assert not bm.admit(_seq(list(range(50, 70))), [], [], 20), "5 pages needed, 1 free: all or nothing"
    assert bm.num_free == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 5 and all(r == 0 for r in bm.ref)
    # freed cached pages are still matchable until handed out again
    assert bm.match(_seq(list(range(9))))[0] == [1, 2]
    c = _seq([40] * 8)
    assert bm.admit(c, [], [], 8)  # takes the 2 oldest free pages (5, then 3: a last page), not the cached ones
    assert bm.match(_seq(list(range(9))))[0] == [1, 2]


def test_prefix_cache_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(radix_cache, "page_key", lambda parent, tokens: 42)  # every page collides
    bm = BlockManager(num_pages=6, page_size=4)
    a = _seq([1, 2, 3, 4, 5])
    bm.admit(a, [], [], 5)
    a.num_computed = 5
    bm.register(a)
    assert bm.match(_seq([9, 9, 9, 9, 9]))[0] == [], "a colliding key with other tokens must not hit"
    assert bm.match(_seq([1, 2, 3, 4, 7]))[0] == [a.block_table[0]]


def test_request_validation_messages():
    eng, _ = mock_engine(num_pages=4)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(Request([1] * 500, SamplingParams(max_new_tokens=100)))
    with pytest.raises(ValueError, match="KV pages"):
        eng.add_request(Request([1] * 40, SamplingParams(max_new_tokens=20)))
    with pytest.raises(ValueError, match="vocab_size"):
        eng.add_request(Request([1, 4000], SamplingParams(max_new_tokens=2)))
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        eng.add_request(Request([1], SamplingParams(max_new_tokens=2, stop_strings=("x",))))
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        SamplingParams(top_p=0.0)
    eng.add_request(Request([1], SamplingParams(max_new_tokens=2), request_id="dup"))
    with pytest.raises(ValueError, match="still unfinished"):
        eng.add_request(Request([1], SamplingParams(max_new_tokens=2), request_id="dup"))


def _args(**kw):
    from miles_fsdp.models import ModelArgs

    base = dict(arch="qwen3", vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                ffn_dim=3072, norm_eps=1e-6, max_position_embeddings=40960)
    return ModelArgs(**{**base, **kw})


def test_auto_prefill_tokens_fit_beside_the_kv_cache(monkeypatch):
    """max_prefill_tokens=0: the largest of 16384 / 8192 / 4096 tokens whose estimated activations
    fit in the memory the KV cache leaves (CUDA), 4096 on CPU; a given budget is used as given;
    0 < budget < page_size and negatives are refused."""
    from types import SimpleNamespace

    from miles_fsdp.engine import Engine, EngineConfig
    from miles_fsdp.engine.config import auto_prefill_tokens, prefill_bytes_per_token

    small, large = _args(), _args(dim=5120, n_heads=64, ffn_dim=25600)  # 0.6B's and a 32B's widths
    per = prefill_bytes_per_token(small, 2)
    assert per == 2 * 2 * (4 * 1024 + (2 * 16 + 2 * 8) * 128 + 3 * 3072)
    assert [auto_prefill_tokens(small, 2, free) for free in (20 * 2**30, 16384 * per - 1, 8192 * per - 1, 0)] == \
        [16384, 8192, 4096, 4096]
    assert auto_prefill_tokens(large, 2, 2 * 2**30) == 4096 and auto_prefill_tokens(large, 2, 20 * 2**30) == 16384
    moe = _args(dim=2048, n_heads=32, n_kv_heads=4, ffn_dim=0, n_experts=128, n_experts_per_tok=8, moe_ffn_dim=768)
    assert prefill_bytes_per_token(moe, 2) == 2 * 2 * (4 * 2048 + 72 * 128 + 8 * (2 * 2048 + 3 * 768))

    eng, _ = mock_engine(max_prefill_tokens=0)  # CPU: the old fixed budget
    assert eng.max_prefill_tokens == eng.scheduler.max_prefill_tokens == 4096
    eng, _ = mock_engine(max_prefill_tokens=48)
    assert eng.max_prefill_tokens == eng.scheduler.max_prefill_tokens == 48
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=r"EngineConfig.max_prefill_tokens=.*0 \(chosen at start\) or >= page_size"):
            EngineConfig(page_size=16, max_prefill_tokens=bad)

    # the CUDA branch: free memory less the KV cache about to be allocated, no device needed
    fake = SimpleNamespace(runner=SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, draft_layers=0),
                           model=SimpleNamespace(args=small), config=EngineConfig(page_size=64), num_pages=1000)
    kv = 1000 * 2 * 28 * 64 * 8 * 128 * 2
    for free, want in ((kv + 16384 * per, 16384), (kv + 16384 * per - 1, 8192), (kv, 4096)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert Engine._auto_prefill_tokens(fake) == want
