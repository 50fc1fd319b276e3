"""GPU: engine logprobs == trainer recompute, bitwise, in bf16 with CUDA graphs on.

Run on a CUDA machine:  pytest -q tests/gpu/test_engine_gpu.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import miles_kernels as mk  # noqa: E402

from miles_fsdp.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402

PAGE = 64


def load(path):
    from miles_fsdp.models import load_model

    return load_model(path, torch.bfloat16, "cuda").eval()


@torch.no_grad()
def trainer_logprobs(model, pairs, params):
    fulls = [p + c for p, c in pairs]
    cu = torch.tensor([0] + [len(f) for f in fulls]).cumsum(0).to(torch.int32).cuda()
    meta, slot_T, _ = mk.varlen_meta(cu, mk.ATTN_BLOCK)
    ids_T = torch.tensor(sum(fulls, []), device="cuda")
    logits_TV = model.logits(model.forward(ids_T, mk.positions_from_cu_seqlens(cu), meta, slot_T))
    out = []
    for i, ((prompt, comp), p) in enumerate(zip(pairs, params)):
        s = int(cu[i]) + len(prompt) - 1
        temp = p.temperature if p.temperature > 0 else 1.0
        lp, _ = mk.logprobs(logits_TV[s : s + len(comp)], torch.tensor(comp, device="cuda"), temp,
                            top_k=p.top_k, top_p=p.top_p)
        out.append(lp.cpu())
    return out


def requests():
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 256, (150,), generator=g).tolist()
    reqs = []
    for i in range(24):
        n_prompt = int(torch.randint(1, 200, (1,), generator=g))
        prompt = torch.randint(0, 256, (n_prompt,), generator=g).tolist()
        if i % 4 == 0:
            prompt = shared + prompt[:10]
        p = SamplingParams(n=1 + i % 3, temperature=[1.0, 0.7, 0.0][i % 3], top_k=[0, 40, 0][i % 3],
                           top_p=[1.0, 1.0, 0.9][i % 3], max_new_tokens=20 + i, seed=i)
        reqs.append(Request(prompt, p))
    return reqs


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_engine_bf16_cuda_graphs_on_policy(tmp_path, arch):
    from miles_fsdp.models.testing import build_tiny_checkpoint

    model = load(build_tiny_checkpoint(tmp_path / arch, arch, seed=1, tokenizer=False,
                                       max_position_embeddings=1024))
    reqs = requests()
    runs = {}
    for name, cfg in {
        "graphs": dict(num_pages=256, cuda_graphs=True, cuda_graph_max_batch=32),
        "eager": dict(num_pages=256, cuda_graphs=False),
        "graphs_by_width": dict(num_pages=256, cuda_graphs=True, cuda_graph_max_batch=32, cuda_graph_by_width=True),
        # tiny KV: preemption + chunked prefill + prefix hits, graphs still on
        "tiny_kv_graphs": dict(num_pages=12, max_prefill_tokens=128, cuda_graphs=True, cuda_graph_max_batch=32),
    }.items():
        required = cfg["cuda_graphs"]  # a capture failure raises: dense and MoE decode must capture
        eng = Engine(model, config=EngineConfig(page_size=PAGE, cuda_graphs_required=required, **cfg),
                     eos_token_ids=[])
        res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
        if name == "graphs":
            g = eng.runner.graphs
            assert g is not None and g.graphs and not g.failed, f"{arch} decode must capture"
            assert eng.metrics()["engine/cuda_graphs_active"] == 1.0
        flat = [(r, s) for r, samples in zip(reqs, res) for s in samples]
        want = trainer_logprobs(model, [(r.prompt_ids, s.token_ids) for r, s in flat], [r.params for r, _ in flat])
        for (r, s), w in zip(flat, want):
            assert torch.equal(s.logprobs, w), f"{arch}/{name}: engine logprobs != trainer recompute"
        runs[name] = [(s.token_ids, s.logprobs.tolist()) for _, s in flat]
        if name == "tiny_kv_graphs":
            assert eng.stats()["num_preemptions"] > 0
    assert runs["graphs"] == runs["eager"] == runs["graphs_by_width"] == runs["tiny_kv_graphs"], \
        "CUDA graphs / schedule changed outputs"


def test_fused_gumbel_noise_equals_torch_ops():
    """The kernel's noise == torch's ops bitwise, with the logs in the kernel (the few u where
    Triton's logf differs from torch's come from the fix table), not torch's fallback passes."""
    from miles_fsdp.engine.sampler import LOG_FIXES_MAX, _log_fixes, _mix32, gumbel_noise, gumbel_noise_torch

    fixes = _log_fixes(torch.device("cuda"))
    assert fixes is not None, f"more than {LOG_FIXES_MAX} u values where the kernel's logs differ from torch's"
    fix_k, fix_v = fixes
    u = (fix_k.float() + 0.5) * (1.0 / (1 << 23))
    assert torch.equal(fix_v.view(torch.int32), (-torch.log(-torch.log(u))).view(torch.int32))

    g = torch.Generator().manual_seed(0)
    seed = torch.randint(0, 2**32, (37,), generator=g, dtype=torch.int64).cuda()
    stream = torch.randint(0, 8, (37,), generator=g).cuda()
    pos = torch.randint(0, 40000, (37,), generator=g).cuda()
    for V in (1, 50, 2048, 151936):
        h = _mix32(_mix32(_mix32(seed) ^ stream) ^ pos)
        got, want = gumbel_noise(seed, stream, pos, V), gumbel_noise_torch(h, V)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"V={V}"


def test_fast_mode_decode_captures(tmp_path):
    from miles_fsdp.models.testing import build_tiny_checkpoint

    model = load(build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", seed=1, tokenizer=False,
                                       max_position_embeddings=1024))
    with mk.use_mode("fast"):
        eng = Engine(model, config=EngineConfig(page_size=PAGE, num_pages=256, cuda_graph_max_batch=32),
                     eos_token_ids=[])
        res = eng.generate(requests())
        g = eng.runner.graphs
        assert g is not None and g.graphs and not g.failed, "fast-mode decode must capture"
        assert all(len(s.token_ids) == r.params.max_new_tokens for r, ss in zip(requests(), res) for s in ss)


def test_capture_failure_raises_when_required_else_warns_and_reports(tmp_path, caplog):
    from miles_fsdp.models.testing import build_tiny_checkpoint

    model = load(build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", seed=1, tokenizer=False,
                                       max_position_embeddings=1024))
    forward = model.forward

    def syncing_forward(*args, **kw):  # a host sync, as bincount's was: not capturable
        out = forward(*args, **kw)
        out.sum().item()
        return out

    model.forward = syncing_forward
    cfg = dict(page_size=PAGE, num_pages=256, cuda_graph_max_batch=8)
    with pytest.raises(RuntimeError, match="CUDA graph capture of the decode step"):
        Engine(model, config=EngineConfig(cuda_graphs_required=True, **cfg), eos_token_ids=[])
    eng = Engine(model, config=EngineConfig(**cfg), eos_token_ids=[])
    assert "CUDA graph capture failed" in caplog.text
    assert eng.cuda_graphs_active is False and eng.metrics()["engine/cuda_graphs_active"] == 0.0
    got = eng.generate(requests()[:4])
    model.forward = forward
    want = Engine(model, config=EngineConfig(cuda_graphs=False, **cfg), eos_token_ids=[]).generate(requests()[:4])
    assert [[s.token_ids for s in r] for r in got] == [[s.token_ids for s in r] for r in want]


def test_invalidated_capture_leaves_cuda_random_ops_working(tmp_path, caplog):
    """A CUDA call a capture forbids invalidates the capture (capture_end fails too); torch < 2.13
    then left the default generator marked as capturing, and every later CUDA random op raised
    'Offset increment outside graph capture'. Required or not, the process goes on."""
    from miles_fsdp.models.testing import build_tiny_checkpoint

    model = load(build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", seed=1, tokenizer=False,
                                       max_position_embeddings=1024))
    forward = model.forward

    def device_syncing_forward(*args, **kw):  # cudaDeviceSynchronize: not capturable, no torch-side check
        torch.cuda.synchronize()
        return forward(*args, **kw)

    model.forward = device_syncing_forward
    cfg = dict(page_size=PAGE, num_pages=256, cuda_graph_max_batch=8)
    torch.cuda.manual_seed(3)
    want = torch.rand(5, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA graph capture of the decode step"):
        Engine(model, config=EngineConfig(cuda_graphs_required=True, **cfg), eos_token_ids=[])
    torch.cuda.manual_seed(3)
    assert torch.equal(torch.rand(5, device="cuda"), want)
    eng = Engine(model, config=EngineConfig(**cfg), eos_token_ids=[])
    assert "CUDA graph capture failed" in caplog.text and eng.cuda_graphs_active is False
    torch.randperm(1000, device="cuda")
    got = eng.generate(requests()[:4])
    model.forward = forward
    want = Engine(model, config=EngineConfig(cuda_graphs=False, **cfg), eos_token_ids=[]).generate(requests()[:4])
    assert [[s.token_ids for s in r] for r in got] == [[s.token_ids for s in r] for r in want]


def test_capture_with_garbage_waiting(tmp_path):
    """The 64-expert draft's capture failed on an H100 when other tests' garbage was waiting (a
    collection inside the capture, which torch no longer prevents). Here dead engines wait in
    reference cycles, and inside each decode-graph capture the forward collects if the collector
    is on (what an automatic collection at any allocation there would do): every capture (decode
    and draft graphs, required) succeeds and decodes the same. With capture_graph's guard taken
    out (gpu_checks.sh capture) the collection resets dead graphs inside the capture and it fails."""
    import gc

    from miles_fsdp.models import load_model
    from miles_fsdp.models.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "moe", "qwen3_moe", seed=1, tokenizer=False, max_position_embeddings=1024)
    model = load_model(path, torch.bfloat16, "cuda", n_mtp=1).eval()
    forward = model.forward

    def collecting_forward(*args, **kw):
        if torch.cuda.is_current_stream_capturing() and gc.isenabled():
            gc.collect()
        return forward(*args, **kw)

    model.forward = collecting_forward
    cfg = EngineConfig(page_size=PAGE, num_pages=512, cuda_graph_max_batch=64, cuda_graphs_required=True,
                       num_speculative_tokens=3)
    reqs = [Request(list(range(5 + i, 40 + i)), SamplingParams(temperature=1.0, max_new_tokens=24, seed=i))
            for i in range(48)]
    want = None
    for _ in range(3):
        eng = Engine(model, config=cfg, eos_token_ids=[])
        got = [[(s.token_ids, s.logprobs.tolist()) for s in r] for r in eng.generate(reqs)]
        assert eng.metrics()["engine/draft_graphs_active"] == 1.0
        assert want is None or got == want
        want = got
        eng.cycle = eng  # garbage only the collector frees, with its graphs, KV cache and pinned buffers
        del eng


def _reference_logprobs(logits_BV, temperature, top_k, top_p):
    """float64 log softmax(filter(logits / T)), the distribution the sampler promises, and
    per row whether the top-p cut is clear of fp32 rounding (no token's mass-before within
    1e-5 of top_p): elsewhere fp32 and float64 may keep a different boundary token."""
    z = logits_BV.double() / temperature
    clear = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if top_k:
        z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        zs = z.sort(-1, descending=True).values
        p = torch.softmax(zs, -1)
        before = torch.cumsum(p, -1) - p
        clear = (before - top_p).abs().amin(-1) > 1e-5
        cut = torch.where(before < top_p, zs, torch.full_like(zs, float("inf"))).amin(-1, keepdim=True)
        z = z.masked_fill(z < cut, float("-inf"))
    return torch.log_softmax(z, -1), clear


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_sampler_real_vocab_follows_the_filtered_distribution(temperature):
    """151,936-token rows whose mass sits in the last vocab chunk (the NaN case): every
    recorded logprob is the float64 one of softmax(filter(logits / T)) at the sampled token,
    every token lies in its support, and frequencies over many streams match it."""
    from miles_fsdp.engine.sampler import RowParams, sample

    V, B = 151_936, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, V, generator=g, device="cuda")
    hot = torch.arange(150_000, 150_040, device="cuda")
    logits[:, hot] += 20 + 2 * torch.randn(B, 40, generator=g, device="cuda")
    logits = logits.to(torch.bfloat16)
    for top_k in (0, 1, 20):
        for top_p in (1.0, 0.9):
            what = f"T={temperature} top_k={top_k} top_p={top_p}"
            ref, clear = _reference_logprobs(logits, temperature, top_k, top_p)
            assert clear.float().mean() > 0.9, f"{what}: premise: most rows have a clear top-p cut"
            ids, lps = sample(logits, [RowParams(temperature, top_k, top_p, 5, i, 100 + i) for i in range(B)])
            ids_t = torch.tensor(ids, device="cuda")
            want = ref.gather(1, ids_t[:, None])[:, 0][clear]
            assert torch.isfinite(want).all(), f"{what}: a token outside the filtered distribution was sampled"
            got = torch.tensor(lps, dtype=torch.float64, device="cuda")
            assert torch.isfinite(got).all(), f"{what}: a recorded logprob is not finite"
            got = got[clear]
            assert torch.allclose(got, want, atol=1e-4, rtol=0), f"{what}: max err {(got - want).abs().max():.3g}"
            N, r = 4096, int(clear.nonzero()[0])  # one row, many streams: frequencies vs the reference
            row = logits[r: r + 1].expand(N, V)
            ids, _ = sample(row, [RowParams(temperature, top_k, top_p, 9, i, 7) for i in range(N)])
            freq = torch.bincount(torch.tensor(ids, device="cuda"), minlength=V).double() / N
            p_ref = ref[r].exp()
            bound = 5 * (p_ref * (1 - p_ref) / N).sqrt() + 1e-3
            assert ((freq - p_ref).abs() <= bound).all(), f"{what}: frequencies off by {(freq - p_ref).abs().max():.4f}"


def test_graph_draw_is_the_sampler_choice_at_real_vocab():
    """The graphed draft's draw (CUDA: x * fl32(1 / T), as torch divides by a Python float)
    picks the sampler's token at 151,936 vocab, ties at the maximum included."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    from draw_check import draw_vs_sampler  # a plain module: test_speculative imports tests/engine's conftest

    draw_vs_sampler("cuda", 151_936, B=256)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_speculation_is_exact_at_batch_64(tmp_path, arch):
    """bf16 on CUDA, 64 requests x 2 samples: K = 3 from CUDA graphs (verify rows padded to 4
    per sequence, the draft chain in its own graphs) gives the tokens and log-probs of K = 0
    decoded from CUDA graphs and of K = 3 eager; without top-k > 1 / top-p < 1 (where the
    graphed draft samples as the eager one) the drafts are the eager ones too."""
    from miles_fsdp.models import load_model
    from miles_fsdp.models.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / arch, arch, seed=1, tokenizer=False, max_position_embeddings=1024)
    model = load_model(path, torch.bfloat16, "cuda", n_mtp=1).eval()
    g = torch.Generator().manual_seed(0)
    grid = [(t, k, p) for t in (0.0, 0.6, 1.0, 1.3) for k in (0, 1, 20) for p in (1.0, 0.9)]
    reqs = [Request(torch.randint(0, 256, (int(torch.randint(4, 120, (1,), generator=g)),), generator=g).tolist(),
                    SamplingParams(n=2, temperature=grid[i % 24][0], top_k=grid[i % 24][1], top_p=grid[i % 24][2],
                                   max_new_tokens=48, seed=i)) for i in range(64)]
    plain = [Request(r.prompt_ids, dataclasses.replace(r.params, top_k=min(r.params.top_k, 1), top_p=1.0))
             for r in reqs]

    def run(k, graphs, requests):
        eng = Engine(model, config=EngineConfig(page_size=PAGE, num_pages=1024, cuda_graph_max_batch=128,
                                                cuda_graphs=graphs, cuda_graphs_required=graphs,
                                                num_speculative_tokens=k), eos_token_ids=[])
        replays = []
        if graphs:
            replay = eng.runner.graphs.replay
            eng.runner.graphs.replay = lambda key, *a: replays.append(key) or replay(key, *a)
        res = eng.generate([Request(list(r.prompt_ids), r.params) for r in requests])
        m = eng.metrics()
        if graphs:
            assert len(replays) > 10 and m.pop("engine/cuda_graphs_active") == 1.0, f"K={k}: decode must replay graphs"
            if k:
                assert m.pop("engine/draft_graphs_active") == 1.0
        return [[(s.token_ids, s.logprobs.tolist()) for s in rs] for rs in res], m

    (want, _), (graphed, m), (eager, _) = run(0, True, reqs), run(3, True, reqs), run(3, False, reqs)
    assert want == graphed == eager and m["engine/spec_mean_accept_len"] >= 1.0
    assert run(3, True, plain)[1] == run(3, False, plain)[1], "the graphs drafted otherwise than the eager drafter"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_one_launch_equals_index_copy(dtype):
    """mk.write_kv on CUDA (one Triton launch for K and V) stores what index_copy_ stores: the
    decode step's K/V at Qwen3-0.6B's layout, v a column slice of the fused projection."""
    from miles_kernels import meta

    T, K, D, P, S = 256, 8, 128, 64, 64
    qkv = torch.randn(T, (16 + 2 * K) * D, device="cuda", dtype=dtype)
    k, v = qkv[:, 16 * D: (16 + K) * D].view(T, K, D), qkv[:, (16 + K) * D:].view(T, K, D)
    slot = torch.randperm(P * S, device="cuda")[:T]
    for idx in (slot, slot.int()):
        caches = [torch.randn(P, S, K, D, device="cuda", dtype=dtype) for _ in range(2)]
        want = [c.clone() for c in caches]
        want[0].view(P * S, K, D).index_copy_(0, slot, k)
        want[1].view(P * S, K, D).index_copy_(0, slot, v)
        assert meta._one_launch(*caches, k, v, idx)
        mk.write_kv(*caches, k, v, idx)
        assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


def test_screen_noise_within_its_bound_everywhere():
    """The screened argmax's fast noise (the GPU's lg2.approx, the series near u = 1) is within
    NOISE_BOUND / 8 of torch's -log(-log(u)) at every one of the 2**23 u values."""
    from miles_fsdp.engine.sampler import NOISE_BOUND, fast_noise, uniform_from_bits

    k = torch.arange(1 << 23, device="cuda")
    err = (fast_noise(k).double() - (-torch.log(-torch.log(uniform_from_bits(k))))).abs().max().item()
    assert err < NOISE_BOUND / 8, f"fast noise off by {err:.3g}"


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_gumbel_argmax_equals_torch_ops(temp, dtype, screen, monkeypatch):
    """The sampler's fused path (noise, chunk maxima, merge), screened by fast logs or not, picks
    the token of the torch ops it replaces, (filter(logits.float() / T) + gumbel_noise).argmax(-1),
    at a 151,936 vocab and 256 rows, with and without top-k / top-p (rows of near ties included);
    and sample() records that token's logprob."""
    from miles_fsdp.engine import sampler
    from miles_fsdp.engine.sampler import RowParams, gumbel_argmax, gumbel_noise, sample

    monkeypatch.setattr(sampler, "SCREEN", screen)
    B, V = 256, 151936
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype).cuda()
    seed = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64).cuda()
    stream, pos = torch.randint(0, 8, (B,), generator=g).cuda(), torch.randint(0, 40000, (B,), generator=g).cuda()
    noise = gumbel_noise(seed, stream, pos, V)
    logits[:8] = (2.0 - noise[:8] * temp).to(dtype)  # z within rounding of 2 / T across the row: the exact path
    want = (logits.float() / temp + noise).argmax(-1)
    assert torch.equal(gumbel_argmax(logits, temp, seed, stream, pos), want)
    for top_k, top_p in ((0, 1.0), (20, 1.0), (0, 0.9), (50, 0.95)):
        x = mk.filter_logits(logits.float() / temp, top_k, top_p)
        want = (x + noise).argmax(-1)
        rows = [RowParams(temp, top_k, top_p, int(seed[i]), int(stream[i]), int(pos[i])) for i in range(B)]
        ids, lps = sample(logits, rows)
        assert ids == want.tolist(), f"top_k={top_k} top_p={top_p}"
        lp, _ = mk.logprobs(logits, want, temp, top_k=top_k, top_p=top_p)
        assert lps == lp.tolist()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_overlap_schedule_at_scale(tmp_path, arch):
    """Overlap scheduling at RL scale: 151,936 vocab, 128 prompts x 2 samples, up to 320 new
    tokens, the sampling grid, stop tokens ending samples at scattered steps (each stopped
    sample computed once more and dropped), 64 experts for MoE: the same tokens, logprobs
    and finish reasons as decoding without it and as eager decoding, and the trainer's
    logprobs bit for bit; most decode steps launched before the previous one was seen."""
    from miles_fsdp.models.testing import build_tiny_checkpoint

    extra = dict(num_experts=64, num_experts_per_tok=8) if arch == "qwen3_moe" else {}
    model = load(build_tiny_checkpoint(tmp_path / arch, arch, seed=2, tokenizer=False, vocab_size=151_936,
                                       max_position_embeddings=1024, **extra))
    g = torch.Generator().manual_seed(1)
    grid = [(t, k, p) for t in (0.6, 1.0, 1.3) for k in (0, 20) for p in (1.0, 0.9)]
    stops = torch.randperm(151_936, generator=g)[:600].tolist()  # ~0.4% a token: most samples stop early
    reqs = [Request(torch.randint(0, 151_936, (int(torch.randint(8, 200, (1,), generator=g)),), generator=g).tolist(),
                    SamplingParams(n=2, temperature=grid[i % 12][0], top_k=grid[i % 12][1], top_p=grid[i % 12][2],
                                   max_new_tokens=64 + 2 * i, seed=i, stop_token_ids=stops)) for i in range(128)]
    runs = {}
    for name, cfg in {"overlap": dict(cuda_graphs=True), "sync": dict(cuda_graphs=True, overlap_schedule=False),
                      "eager": dict(cuda_graphs=False)}.items():
        eng = Engine(model, config=EngineConfig(page_size=PAGE, num_pages=2048, cuda_graphs_required=cfg["cuda_graphs"],
                                                **cfg), eos_token_ids=[])
        overlapped, launch = [], eng.runner.launch
        eng.runner.launch = lambda b, prev=None: (overlapped.append(1) if prev is not None else None) or launch(b, prev)
        res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
        runs[name] = [(s.token_ids, s.logprobs.tolist(), s.finish_reason) for rs in res for s in rs]
        if name == "overlap":
            assert len(overlapped) > 100, f"{arch}: only {len(overlapped)} decode steps overlapped"
            flat = [(r, s) for r, rs in zip(reqs, res) for s in rs][::8]
            want = trainer_logprobs(model, [(r.prompt_ids, s.token_ids) for r, s in flat], [r.params for r, _ in flat])
            assert all(torch.equal(s.logprobs, w) for (_, s), w in zip(flat, want)), f"{arch}: != trainer recompute"
        else:
            assert not overlapped
    reasons = [r for _, _, r in runs["overlap"]]
    assert 50 < sum(r.value == "stop" for r in reasons) < len(reasons), "the stop tokens must end some samples"
    assert runs["overlap"] == runs["sync"] == runs["eager"], f"{arch}: overlap scheduling changed outputs"


@pytest.mark.parametrize("batch,tma", [(64, False), (256, True)], ids=["b64", "b256-tma"])
def test_pdl_gives_the_same_tokens_and_logprobs(tmp_path, monkeypatch, batch, tma):
    """Programmatic dependent launch (launch.PDL, gdc.py): a kernel may start while the one before
    it finishes and waits for it before touching memory. A kernel that read or wrote too early would
    race and show here: `batch` requests x 256 new tokens on Qwen3-0.6B's layer shapes (4 layers) with
    the real vocabulary, sampled (temperature, top-k, top-p), decoded from CUDA graphs and eagerly,
    with PDL on give the tokens and log-probs of PDL off, and the trainer's recompute. b256-tma: the
    persistent TMA linears with PDL too (launch.PDL_TMA; the decode step's 128-row tiles, the prefill's)."""
    from miles_fsdp.models.testing import build_tiny_checkpoint
    from miles_kernels._triton import decode_attention, fused_linears, launch, matmul

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    path = build_tiny_checkpoint(tmp_path / "q", "qwen3", seed=3, tokenizer=False, vocab_size=151_936,
                                 hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, max_position_embeddings=1024)
    model = load(path)
    g = torch.Generator().manual_seed(5)
    grid = [(t, k, p) for t in (0.6, 1.0) for k in (0, 20) for p in (1.0, 0.9)]
    reqs = [Request(torch.randint(0, 151_936, (int(torch.randint(16, 300, (1,), generator=g)),), generator=g).tolist(),
                    SamplingParams(temperature=grid[i % 8][0], top_k=grid[i % 8][1], top_p=grid[i % 8][2],
                                   max_new_tokens=256, seed=i)) for i in range(batch)]

    def run(pdl, graphs):
        monkeypatch.setattr(launch, "PDL", pdl)
        monkeypatch.setattr(launch, "PDL_TMA", pdl and tma)
        eng = Engine(model, config=EngineConfig(page_size=PAGE, num_pages=max(1024, 10 * batch),
                                                cuda_graph_max_batch=batch, cuda_graphs=graphs,
                                                cuda_graphs_required=graphs), eos_token_ids=[])
        res = eng.generate([Request(list(r.prompt_ids), r.params) for r in reqs])
        return [(s.token_ids, s.logprobs) for rs in res for s in rs]

    want = run(False, True)
    for graphs in (True, False):
        got = run(True, graphs)
        for i, ((t, lp), (wt, wlp)) in enumerate(zip(got, want)):
            assert t == wt and torch.equal(lp, wlp), f"request {i}: PDL ({'graphs' if graphs else 'eager'}) changed it"
    pdl_kernels = [decode_attention.decode_pairs_kernel] + (
        [matmul._linear_tma_kernel, fused_linears._linears_tma_kernel, fused_linears._swiglu_tma_kernel] if tma
        else [fused_linears._linears_kernel, fused_linears._swiglu_kernel])
    for k in pdl_kernels:
        assert any(c.metadata.launch_pdl for c in k.kernels.values()), f"{k.fn.__name__}: no launch with PDL"
    monkeypatch.setattr(launch, "PDL", True)
    monkeypatch.setattr(launch, "PDL_TMA", False)
    recompute = trainer_logprobs(model, [(r.prompt_ids, t) for r, (t, _) in zip(reqs, want)], [r.params for r in reqs])
    assert all(torch.equal(lp.cpu(), w) for (_, lp), w in zip(want, recompute)), "engine != trainer recompute"
