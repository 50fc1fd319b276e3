"""THE property: the engine's recorded logprobs equal the trainer's recompute, bitwise.

The trainer side is one packed forward over prompt + completion of every sample
(mk.varlen_meta + model.forward + model.logits + mk.logprobs). The engine side varies what
could break it: batch composition, prefix-cache hits (n > 1 and repeated prompts), chunked
prefill, and preemption by recompute forced by a tiny KV budget.
"""

from __future__ import annotations

import miles_kernels as mk
import pytest
import torch

from miles_fsdp.engine import Engine, EngineConfig, Request, SamplingParams

from conftest import load_tiny, trainer_logprobs

PAGE = 2 * mk.ATTN_BLOCK


def make_requests(seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (2 * PAGE + 3,), generator=g).tolist()
    lens = [3, PAGE + 5, 2 * PAGE, 2 * PAGE + 7]
    sp = [
        SamplingParams(n=1, temperature=1.0, max_new_tokens=9, seed=1),
        SamplingParams(n=3, temperature=0.8, top_k=20, max_new_tokens=12, seed=2),
        SamplingParams(n=1, temperature=0.0, max_new_tokens=6),
        SamplingParams(n=2, temperature=1.2, top_p=0.9, max_new_tokens=10, seed=4),
    ]
    reqs = [Request(torch.randint(0, 256, (n,), generator=g).tolist(), p) for n, p in zip(lens, sp)]
    # a repeated prompt (prefix-cache hit across requests) and a shared-prefix pair
    reqs.append(Request(list(reqs[1].prompt_ids), SamplingParams(n=1, max_new_tokens=8, seed=5)))
    reqs.append(Request(shared + [7, 8], SamplingParams(n=1, max_new_tokens=8, seed=6)))
    reqs.append(Request(shared + [9], SamplingParams(n=1, max_new_tokens=8, seed=7)))
    return reqs


def packed_trainer_logprobs(model, pairs: list[tuple[list[int], list[int]]], params: list) -> list[torch.Tensor]:
    """All samples in one packed trainer forward (another batch composition again)."""
    fulls = [p + c for p, c in pairs]
    cu = torch.tensor([0] + [len(f) for f in fulls], dtype=torch.int32).cumsum(0).to(torch.int32)
    meta, slot_T, _ = mk.varlen_meta(cu, mk.ATTN_BLOCK)
    with torch.no_grad():
        hidden_TD = model.forward(torch.tensor(sum(fulls, [])), mk.positions_from_cu_seqlens(cu), meta, slot_T)
        logits_TV = model.logits(hidden_TD)
    out = []
    for i, ((prompt, comp), p) in enumerate(zip(pairs, params)):
        start = int(cu[i]) + len(prompt) - 1
        temp = p.temperature if p.temperature > 0 else 1.0
        lp, _ = mk.logprobs(logits_TV[start : start + len(comp)], torch.tensor(comp), temp, top_k=p.top_k, top_p=p.top_p)
        out.append(lp)
    return out


CONFIGS = {
    "roomy": dict(num_pages=64, max_prefill_tokens=1024),
    "chunked": dict(num_pages=64, max_prefill_tokens=PAGE),
    # 9 usable pages of 32 tokens for ~11 samples of up to ~83 tokens: constant preemption
    "tiny_kv": dict(num_pages=10, max_prefill_tokens=PAGE + mk.ATTN_BLOCK),
    "no_prefix_cache": dict(num_pages=10, max_prefill_tokens=PAGE, prefix_cache=False),
}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_engine_logprobs_equal_trainer_bitwise(tiny_ckpts, arch):
    model = load_tiny(tiny_ckpts[arch])
    reqs = make_requests(seed=0)
    first = None
    for name, cfg in CONFIGS.items():
        eng = Engine(model, config=EngineConfig(page_size=PAGE, **cfg), eos_token_ids=[])
        results = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
        pairs, params, flat = [], [], []
        for r, samples in zip(reqs, results):
            assert [s.sample_index for s in samples] == list(range(r.params.n))
            for s in samples:
                assert s.logprobs.dtype == torch.float32 and len(s.logprobs) == len(s.token_ids) > 0
                single = trainer_logprobs(model, r.prompt_ids, s.token_ids, r.params)
                assert torch.equal(s.logprobs, single), f"{arch}/{name}: engine logprobs != trainer recompute"
                pairs.append((r.prompt_ids, s.token_ids))
                params.append(r.params)
                flat.append(s)
        for s, lp in zip(flat, packed_trainer_logprobs(model, pairs, params)):
            assert torch.equal(s.logprobs, lp), f"{arch}/{name}: packed trainer batch differs"
        # sampling is batch- and schedule-invariant: every config gives the very same samples
        tokens = [(s.token_ids, s.logprobs.tolist()) for s in flat]
        if first is None:
            first = tokens
        assert tokens == first, f"{arch}/{name}: samples depend on the schedule"
        stats = eng.stats()
        if name == "tiny_kv":
            assert stats["num_preemptions"] > 0, "the tiny KV budget should force preemption"
        if name == "roomy":
            assert any(s.num_cached_prompt_tokens > 0 for s in flat), "expected prefix-cache hits"


def test_single_request_alone_equals_in_batch(tiny_ckpts):
    model = load_tiny(tiny_ckpts["qwen3"])
    reqs = make_requests(seed=1)
    cfg = EngineConfig(page_size=PAGE, num_pages=64, max_prefill_tokens=64)
    together = Engine(model, config=cfg, eos_token_ids=[]).generate(reqs)
    for i in (0, 3):
        alone = Engine(model, config=cfg, eos_token_ids=[]).generate([Request(list(reqs[i].prompt_ids), reqs[i].params)])
        for a, b in zip(alone[0], together[i]):
            assert a.token_ids == b.token_ids and torch.equal(a.logprobs, b.logprobs)
