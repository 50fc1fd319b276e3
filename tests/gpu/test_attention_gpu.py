"""miles_kernels attention on a real GPU: prefill == chunked prefill == decode bitwise over paged
caches, the swapped decode tile, fast mode, the fused q/k norm + RoPE + KV write + attention, CUDA
graph replay, and the Gluon training forward against the Triton one. A file of its own so that a
fresh machine compiles it beside the other kernel files (tools/gpu_checks.sh: a process a file).

Run on a CUDA machine (triton >= 3.6):  python -m pytest -q tests/gpu/test_attention_gpu.py
"""

import pytest
import torch
from kernel_asserts import DTYPES, _accurate, _gen, _randn, _same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def kt():
    from miles_kernels import _triton

    return _triton


def _paged_cache(k_LKD, v_LKD, page, g):
    L, K, D = k_LKD.shape
    n = -(-L // page)
    pages = torch.randperm(n + 4, generator=torch.Generator().manual_seed(0))[:n]
    kc = torch.full((n + 4, page, K, D), float("nan"), dtype=k_LKD.dtype, device="cuda")
    vc = kc.clone()
    pos = torch.arange(L, device="cuda")
    kc[pages.cuda()[pos // page], pos % page] = k_LKD
    vc[pages.cuda()[pos // page], pos % page] = v_LKD
    return kc, vc, pages.to(torch.int32).cuda()


def _attn(kt, q, kc, vc, seqs, scale, lse=None):
    """seqs: (q_len, kv_len, pages) per sequence; q packed in that order."""
    cu = torch.tensor([0] + torch.tensor([s[0] for s in seqs]).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kv = torch.tensor([s[1] for s in seqs], dtype=torch.int32, device="cuda")
    bt = torch.stack([s[2] for s in seqs])
    return kt.attention(q, kc, vc, cu, kv, bt, max(s[0] for s in seqs), scale, lse_HT=lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,page", [((16, 8), 16), ((32, 8), 64), ((12, 4), 32)])
def test_attention_prefill_chunked_decode_bitwise(kt, dtype, heads, page):
    g = _gen(4)
    (H, K), D, L = heads, 128, 700  # crosses KV_SPLIT more than once
    q = _randn(L, H, D, dtype=dtype, g=g)
    k, v = _randn(L, K, D, dtype=dtype, g=g), _randn(L, K, D, dtype=dtype, g=g)
    kc, vc, pages = _paged_cache(k, v, page, g)
    scale = D**-0.5
    full = _attn(kt, q, kc, vc, [(L, L, pages)], scale)
    kd, vd = k.double().repeat_interleave(H // K, 1), v.double().repeat_interleave(H // K, 1)
    s = torch.einsum("thd,lhd->htl", q.double(), kd) * scale
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)[None], float("-inf"))
    _accurate(full, torch.einsum("htl,lhd->thd", s.softmax(-1), vd), dtype, "attention vs float64")
    start = 0
    for n in (1, 255, 3, 130, 311):
        _same(_attn(kt, q[start : start + n], kc, vc, [(n, start + n, pages)], scale), full[start : start + n],
              f"chunk {start}:{start + n} vs prefill")
        start += n
    rows = [0, 15, 16, 63, 64, 255, 256, 257, 511, L - 1]
    dec = _attn(kt, q[rows], kc, vc, [(1, t + 1, pages) for t in rows], scale)
    _same(dec, full[rows], "decode batch vs prefill rows")
    # the fp32 LSE shows rounding differences a 16-bit output can hide
    lse_full, lse_dec = (torch.empty(H, n, device="cuda") for n in (L, len(rows)))
    _attn(kt, q, kc, vc, [(L, L, pages)], scale, lse_full)
    _attn(kt, q[rows], kc, vc, [(1, t + 1, pages) for t in rows], scale, lse_dec)
    _same(lse_dec, lse_full[:, rows], "decode rows' LSE vs prefill rows'")
    for t in (0, 256, L - 1):
        _same(_attn(kt, q[t : t + 1], kc, vc, [(1, t + 1, pages)], scale)[0], full[t], f"decode alone at {t}")
    # training reads the packed K/V in place: the same bits, also for several packed sequences
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    lse_packed = torch.empty(H, L, device="cuda")
    _same(kt.packed_attention(q, k, v, cu, L, scale, lse_packed), full, "packed_attention vs paged prefill")
    _same(lse_packed, lse_full, "packed_attention LSE vs paged prefill's")
    lens = [300, 1, 64, 335]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    packed = kt.packed_attention(q, k, v, cu, max(lens), scale)
    for b, n in enumerate(lens):
        lo = int(cu[b])
        kc_b, vc_b, pages_b = _paged_cache(k[lo: lo + n], v[lo: lo + n], page, g)
        _same(packed[lo: lo + n], _attn(kt, q[lo: lo + n], kc_b, vc_b, [(n, n, pages_b)], scale),
              f"packed sequence {b} ({n} tokens) vs its paged prefill")


@pytest.mark.parametrize("row_sum", ["dot", "exact", "fixed"])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
def test_attention_swapped_decode_bitwise(kt, monkeypatch, row_sum, heads):
    """DECODE_TILE "swapped" (decode_attention.py) with a shared row sum: decode rows in a batch
    of 256 (one program a pair; also under a register cap), of 16 (split programs) and verify chunks
    of 3 and 8 tokens, and of 256 / 65 two pairs a program (DECODE_PAIRS), output and LSE bitwise ==
    the packed prefill with the same ROW_SUM (wgmma's sums must not depend on which operand a
    matrix is)."""
    from miles_kernels._triton import paged_attention as A

    monkeypatch.setattr(A, "ROW_SUM", row_sum)
    g = _gen(6)
    (H, K), D, L = heads, 128, 1100
    q = _randn(L, H, D, dtype=torch.bfloat16, g=g) * 2
    k, v = _randn(L, K, D, dtype=torch.bfloat16, g=g), _randn(L, K, D, dtype=torch.bfloat16, g=g)
    kc, vc, pages = _paged_cache(k, v, 64, g)
    scale = D**-0.5
    lse = torch.empty(H, L, device="cuda")
    full = kt.packed_attention(q, k, v, torch.tensor([0, L], dtype=torch.int32, device="cuda"), L, scale, lse)
    monkeypatch.setattr(A, "DECODE_TILE", "swapped")
    for n in (256, 16):
        rows = torch.linspace(0, L - 1, n).long().tolist()
        lse_d = torch.empty(H, n, device="cuda")
        dec = _attn(kt, q[rows], kc, vc, [(1, t + 1, pages) for t in rows], scale, lse_d)
        _same(dec, full[rows], f"swapped decode batch {n} vs prefill ({row_sum})")
        _same(lse_d, lse[:, rows], f"swapped decode batch {n} LSE vs prefill ({row_sum})")
    for n, end in ((3, 700), (8, 1100)):
        _same(_attn(kt, q[end - n: end], kc, vc, [(n, end, pages)], scale), full[end - n: end],
              f"swapped verify chunk of {n} vs prefill ({row_sum})")
    rows = torch.linspace(0, L - 1, 256).long().tolist()
    for launch in ((4, 3, 168), (4, 2, 128)):  # a register cap: more programs an SM, the same bits
        monkeypatch.setattr(A, "_SWAPPED_LAUNCH", launch)
        _same(_attn(kt, q[rows], kc, vc, [(1, t + 1, pages) for t in rows], scale), full[rows],
              f"swapped decode batch 256 at launch {launch} vs prefill ({row_sum})")
    monkeypatch.setattr(A, "_SWAPPED_LAUNCH", None)
    for name, value in (("DECODE_PAIRS", 2), ("DECODE_PAIRS_MIN", 1), ("DECODE_PAIRS_MAX", 1 << 30), ("WALK", "one")):
        monkeypatch.setattr(A, name, value)
    grids, pairs_kernel = [], A.decode_pairs_kernel
    counted = type("Count", (), {"__getitem__": lambda self, grid: grids.append(grid) or pairs_kernel[grid]})
    monkeypatch.setattr(A, "decode_pairs_kernel", counted())
    for n in (256, 65):  # 65: pairs from DECODE_PROGRAMS on, one program walking all of a pair's splits
        rows = torch.linspace(0, L - 1, n).long().tolist()
        lse_d = torch.empty(H, n, device="cuda")
        _same(_attn(kt, q[rows], kc, vc, [(1, t + 1, pages) for t in rows], scale, lse_d), full[rows],
              f"swapped decode batch {n}, two pairs a program, vs prefill ({row_sum})")
        _same(lse_d, lse[:, rows], f"swapped decode batch {n}, two pairs a program, LSE vs prefill ({row_sum})")
    assert [g[0] for g in grids] == [256 * K // 2, 65 * K // 2], grids


def test_fast_mode_paged_attention(kt):
    """Fast mode's attention without autograd is the paged Triton kernel (SDPA cannot read
    pages): decode, verify (4 queries a sequence) and prefill chunks of several lengths, against
    fast mode's SDPA reference, and bitwise invariant mode's (the same kernel)."""
    import miles_kernels as mk
    from miles_kernels import _ref

    g = _gen(6)
    dtype, H, K, D, page, L, B = torch.bfloat16, 16, 8, 128, 64, 600, 8
    k, v = _randn(L, K, D, dtype=dtype, g=g), _randn(L, K, D, dtype=dtype, g=g)
    kc, vc, pages = _paged_cache(k, v, page, g)
    for q_lens in ([1] * B, [4] * B, [1, 37, 200, 5, 64, 3, 130, 9]):
        cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
        q = _randn(int(cu[-1]), H, D, dtype=dtype, g=g)
        lens = torch.tensor([n + 37 * b for b, n in enumerate(q_lens)], dtype=torch.int32, device="cuda")
        meta = mk.AttnMeta(cu, lens, pages[None].expand(B, -1).contiguous(), max(q_lens))
        with mk.use_mode("fast"):
            got = mk.attention(q, kc, vc, meta, D**-0.5)
        # the kernel reads the NaN-filled cache (unused slots must never reach the output); the
        # reference gathers whole pages and masks, and SDPA's 0 * NaN is NaN, so it reads a copy
        # with the unused slots zeroed
        ref = _ref.attention(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), meta, D**-0.5)
        _accurate(got, ref, dtype, f"fast-mode paged attention, query lengths {q_lens}")
        _same(got, mk.attention(q, kc, vc, meta, D**-0.5), f"fast vs invariant attention, query lengths {q_lens}")


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_qk_norm_rope_kv_attention_one_launch(kt, mode):
    """The engine's path of mk.qk_norm_rope_kv_attention (one kernel normalises and rotates q and
    k and stores k and v in the cache) gives the two ops' bits: output and both caches, decode
    and prefill chunks, Qwen3-0.6B / 8B heads, q/k/v as views of one fused projection."""
    import dataclasses

    import miles_kernels as mk
    from miles_kernels.ops import _norm_rope_cache_kernels

    g = _gen(14)
    dtype, D, page = torch.bfloat16, 128, 64
    for H, K in ((16, 8), (32, 8)):
        q_w, k_w = 1 + 0.1 * _randn(D, dtype=dtype, g=g), 1 + 0.1 * _randn(D, dtype=dtype, g=g)
        for q_lens in ([1] * 64, [1, 37, 200, 5, 64, 3, 130, 9]):
            B = len(q_lens)
            cu = torch.tensor([0] + q_lens).cumsum(0)
            meta, slot, n_pages = mk.varlen_meta(cu, page, device="cuda")
            meta = dataclasses.replace(meta, packed=False)  # the engine's paged meta
            T = int(cu[-1])
            qkv = _randn(T, (H + 2 * K) * D, dtype=dtype, g=g)
            q, k, v = (t.view(T, -1, D) for t in qkv.split((H * D, K * D, K * D), dim=1))
            inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda") / D))
            cos, sin = mk.rope_cos_sin(torch.arange(T, device="cuda") * 7, inv_freq)
            outs = []
            for fused in (True, False):
                kc, vc = (torch.full((n_pages, page, K, D), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
                with mk.use_mode(mode):
                    if fused:
                        path = _norm_rope_cache_kernels(q, k, v, q_w, k_w, kc, vc, meta, slot)
                        assert path is kt, "not the one-launch path"
                        o = mk.qk_norm_rope_kv_attention(q, k, v, q_w, k_w, cos, sin, 1e-6, kc, vc, meta, slot, D**-0.5)
                    else:
                        qn, kn = mk.qk_norm_rope(q, k, q_w, k_w, cos, sin, 1e-6)
                        o = mk.kv_attention(qn, kn, v, kc, vc, meta, slot, D**-0.5)
                outs.append((o, kc.nan_to_num(7.0), vc.nan_to_num(7.0)))
            for a, b, what in zip(outs[0], outs[1], ("output", "k cache", "v cache")):
                _same(a, b, f"{mode} H={H} K={K} B={B}: {what}")


def test_cuda_graph_replay_decode_attention_and_linear(kt):
    g = _gen(5)
    dtype, H, K, D, page, L, B = torch.bfloat16, 16, 8, 128, 16, 300, 4
    q_all = _randn(L, H, D, dtype=dtype, g=g)
    k, v = _randn(L, K, D, dtype=dtype, g=g), _randn(L, K, D, dtype=dtype, g=g)
    kc, vc, pages = _paged_cache(k, v, page, g)
    bt = pages[None].expand(B, -1).contiguous()
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    q = q_all[:B].clone()
    kv = torch.tensor([10, 20, 30, 40], dtype=torch.int32, device="cuda")
    x = _randn(B, 1024, dtype=dtype, g=g)
    w = _randn(3072, 1024, dtype=dtype, g=g, scale=1 / 32)
    for _ in range(2):  # compile outside the graph
        kt.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5), kt.linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_static = kt.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5)
        y_static = kt.linear(x, w)
    for step, lens in enumerate(([5, 77, 256, 299], [1, 257, 100, 300])):
        q.copy_(q_all[step * B : step * B + B])
        kv.copy_(torch.tensor(lens, dtype=torch.int32))
        x.copy_(_randn(B, 1024, dtype=dtype, g=g))
        graph.replay()
        _same(o_static, kt.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5), f"graph replay attention step {step}")
        _same(y_static, kt.linear(x, w), f"graph replay linear step {step}")


@pytest.mark.parametrize("heads,D,dtype,lens,q_mul", [
    ((16, 8), 128, torch.bfloat16, [4096], 1.0),
    ((16, 8), 128, torch.bfloat16, [1000, 3000, 77, 4096, 1], 4.0),
    ((32, 8), 128, torch.float16, [2500], 1.0),
    ((12, 4), 128, torch.bfloat16, [777, 1290], 2.0),
    ((8, 8), 64, torch.bfloat16, [1500, 63], 1.0),
    ((64, 4), 128, torch.bfloat16, [700], 1.0),
])
def test_gluon_forward_bitwise(kt, monkeypatch, heads, D, dtype, lens, q_mul):
    """packed_attention on Hopper runs gluon_attention's kernel: output and LSE bitwise == the
    Triton kernel's (GLUON_FWD off), with and without the LSE, GQA groups of 1 to 16 (3: padded
    rows), head dims 64 and 128, bf16 and fp16, packs with 1-token and 63-token sequences."""
    from miles_kernels._triton import gluon_attention as GA
    from miles_kernels._triton import paged_attention as A

    if torch.cuda.get_device_capability() != (9, 0) or not GA.usable():
        pytest.skip("the Gluon forward runs on sm_90 with the Triton releases in GA.TESTED_TRITON")
    g = _gen(11)
    (H, K), T = heads, sum(lens)
    q = _randn(T, H, D, dtype=dtype, g=g) * q_mul
    k, v = _randn(T, K, D, dtype=dtype, g=g), _randn(T, K, D, dtype=dtype, g=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    scale = D**-0.5
    calls = []
    real = GA.packed_attention_fwd
    monkeypatch.setattr(GA, "packed_attention_fwd", lambda *a: calls.append(1) or real(*a))
    lse_g = torch.full((H, T), float("nan"), device="cuda")
    out_g = kt.packed_attention(q, k, v, cu, max(lens), scale, lse_g)
    out_g2 = kt.packed_attention(q, k, v, cu, max(lens), scale)
    assert len(calls) == 2, "packed_attention did not take the Gluon kernel"
    monkeypatch.setattr(A, "GLUON_FWD", False)
    lse_t = torch.full((H, T), float("nan"), device="cuda")
    out_t = kt.packed_attention(q, k, v, cu, max(lens), scale, lse_t)
    assert len(calls) == 2
    _same(out_g, out_t, "Gluon forward vs Triton")
    _same(out_g2, out_t, "Gluon forward without LSE vs Triton")
    _same(lse_g, lse_t, "Gluon forward LSE vs Triton")


@pytest.mark.parametrize("heads,D,dtype,page", [
    ((16, 8), 128, torch.bfloat16, 64),
    ((32, 8), 128, torch.float16, 128),
    ((12, 4), 128, torch.bfloat16, 64),
    ((8, 8), 64, torch.bfloat16, 256),
])
def test_gluon_paged_prefill_bitwise(kt, monkeypatch, heads, D, dtype, page):
    """attention's prefill over a paged cache by gluon_attention's kernel (GLUON_PAGED): output and
    LSE bitwise == the paged Triton kernel's, for fresh chunks and chunks after a cached prefix (a
    1-token one among them), sequences ending mid-page and mid-block, pages in random order and every
    slot no sequence owns NaN (a stale slot must read as zero)."""
    from miles_kernels._triton import gluon_attention as GA
    from miles_kernels._triton import paged_attention as A

    if torch.cuda.get_device_capability() != (9, 0) or not GA.usable():
        pytest.skip("the Gluon forward runs on sm_90 with the Triton releases in GA.TESTED_TRITON")
    g = _gen(12)
    (H, K) = heads
    chunks = [(1000, 1000), (300, 2348), (77, 77), (513, 4096), (1, 700), (129, 129 + 64)]  # (q_len, kv_len)
    width = max(-(-kv // page) for _, kv in chunks)
    n_pages = sum(-(-kv // page) for _, kv in chunks) + 3
    order = torch.randperm(n_pages, generator=torch.Generator().manual_seed(3)).tolist()
    kc = torch.full((n_pages, page, K, D), float("nan"), dtype=dtype, device="cuda")
    vc = kc.clone()
    table = torch.zeros(len(chunks), width, dtype=torch.int32)
    for b, (_, kv) in enumerate(chunks):
        pages = [order.pop() for _ in range(-(-kv // page))]
        table[b, : len(pages)] = torch.tensor(pages)
        pos = torch.arange(kv)
        pg = torch.tensor(pages)[pos // page].cuda()
        kc[pg, (pos % page).cuda()] = _randn(kv, K, D, dtype=dtype, g=g)
        vc[pg, (pos % page).cuda()] = _randn(kv, K, D, dtype=dtype, g=g)
    T = sum(q for q, _ in chunks)
    q = _randn(T, H, D, dtype=dtype, g=g)
    cu = torch.tensor([0] + torch.tensor([c[0] for c in chunks]).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kv_lens = torch.tensor([c[1] for c in chunks], dtype=torch.int32, device="cuda")
    bt, max_q, scale = table.cuda(), max(c[0] for c in chunks), D**-0.5
    calls = []
    real = GA.paged_attention_fwd
    monkeypatch.setattr(GA, "paged_attention_fwd", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(A, "GLUON_PAGED", True)
    lse_g = torch.full((H, T), float("nan"), device="cuda")
    out_g = kt.attention(q, kc, vc, cu, kv_lens, bt, max_q, scale, lse_HT=lse_g)
    out_g2 = kt.attention(q, kc, vc, cu, kv_lens, bt, max_q, scale)
    assert len(calls) == 2, "attention's prefill did not take the Gluon kernel"
    monkeypatch.setattr(A, "GLUON_PAGED", False)
    lse_t = torch.full((H, T), float("nan"), device="cuda")
    out_t = kt.attention(q, kc, vc, cu, kv_lens, bt, max_q, scale, lse_HT=lse_t)
    assert len(calls) == 2
    assert not out_t.isnan().any(), "the Triton kernel read a stale NaN slot"
    _same(out_g, out_t, "Gluon paged prefill vs Triton")
    _same(out_g2, out_t, "Gluon paged prefill without LSE vs Triton")
    _same(lse_g, lse_t, "Gluon paged prefill LSE vs Triton")
