"""Sweep paged-attention knobs (KV_BLOCK, KV_SPLIT, prefill tile): bitwise prefill == chunked == decode, then time.

    python tools/bench/attn_sweep.py OUT.json              # the knob grid
    python tools/bench/attn_sweep.py OUT.json --decode     # DECODE_PROGRAMS at the engine's decode shapes
    python tools/bench/attn_sweep.py OUT.json --prefill    # training prefill (packed K/V) vs flash, per tile
    python tools/bench/attn_sweep.py OUT.json --prefill --tall  # the same for 2-stage and 256-row tiles
    python tools/bench/attn_sweep.py OUT.json --decode-tiles   # decode tile (rows, warps, stages) vs SDPA
    python tools/bench/attn_sweep.py OUT.json --rowsum         # each ROW_SUM: bits, prefill; decode in both tiles
    python tools/bench/attn_sweep.py OUT.json --rowsum --modes reduce,fixed   # only these ROW_SUMs
    python tools/bench/attn_sweep.py OUT.json --swapped-launch # the swapped decode tile per (warps, stages), WALK
    python tools/bench/attn_sweep.py OUT.json --walk           # WALK splits vs one: bits, decode, forward
    python tools/bench/attn_sweep.py OUT.json --pairs          # decode with one / two pairs a program (DECODE_PAIRS)
    python tools/bench/attn_sweep.py OUT.json --walk --tiles   # the same, the forward per prefill tile
    python tools/bench/attn_sweep.py OUT.json --tma [--tiles]  # packed K/V by TMA vs pointers; KV_SPLIT's cost
    python tools/bench/attn_sweep.py OUT.json --tma-paged      # the engine's paged caches by TMA vs pointers

--prefill: for each (KV_BLOCK, prefill BLOCK_M, warps, stages) the bits are checked first
(prefill == chunked == decode on pages of 16/64/32; packed == paged), then the training
forward (packed_attention with the LSE, one causal sequence of L tokens) is timed from CUDA
graph replays against
flash's varlen forward (SDPA's flash path, the same GQA heads) at L = 1k, 4k, 16k for the
Qwen3-0.6B (16 q / 8 kv heads) and 8B (32 / 8) shapes, head_dim 128.
"""

import json
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from miles_kernels._triton import paged_attention as A

DT = torch.bfloat16


def paged(k, v, page, g):
    L, K, D = k.shape
    n = -(-L // page)
    pages = torch.randperm(n + 4, generator=torch.Generator().manual_seed(0))[:n]
    kc = torch.full((n + 4, page, K, D), float("nan"), dtype=k.dtype, device="cuda")
    vc = kc.clone()
    pos = torch.arange(L, device="cuda")
    kc[pages.cuda()[pos // page], pos % page] = k
    vc[pages.cuda()[pos // page], pos % page] = v
    return kc, vc, pages.to(torch.int32).cuda()


def attn(q, kc, vc, seqs, scale):
    cu = torch.tensor([0] + torch.tensor([s[0] for s in seqs]).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kv = torch.tensor([s[1] for s in seqs], dtype=torch.int32, device="cuda")
    bt = torch.stack([s[2] for s in seqs])
    return A.attention(q, kc, vc, cu, kv, bt, max(s[0] for s in seqs), scale)


def check():
    bad = []
    for (H, K), page in (((32, 8), 16), ((32, 8), 64), ((12, 4), 32)):
        g = torch.Generator(device="cuda").manual_seed(4)
        D, L = 128, 700
        q = torch.randn(L, H, D, generator=g, device="cuda").to(DT)
        k = torch.randn(L, K, D, generator=g, device="cuda").to(DT)
        v = torch.randn(L, K, D, generator=g, device="cuda").to(DT)
        kc, vc, pages = paged(k, v, page, g)
        full = attn(q, kc, vc, [(L, L, pages)], D**-0.5)
        s = torch.einsum("thd,lhd->htl", q.double(), k.double().repeat_interleave(H // K, 1)) * D**-0.5
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)[None], float("-inf"))
        ref = torch.einsum("htl,lhd->thd", s.softmax(-1), v.double().repeat_interleave(H // K, 1))
        err = (full.double() - ref).abs().max().item()
        if err > 1.5e-2 * ref.abs().max().item():
            bad.append(f"acc {err}")
        start = 0
        for n in (1, 255, 3, 130, 311):
            if not torch.equal(attn(q[start:start + n], kc, vc, [(n, start + n, pages)], D**-0.5), full[start:start + n]):
                bad.append(f"chunk {start}:{start + n} page {page}")
            start += n
        rows = [0, 15, 16, 255, 256, 257, 511, L - 1]
        if not torch.equal(attn(q[rows], kc, vc, [(1, t + 1, pages) for t in rows], D**-0.5), full[rows]):
            bad.append(f"decode page {page}")
    return bad


def timings():
    H, K, D, page = 32, 8, 128, 64
    out = {}
    for B in (1, 64):
        ctx = 4096
        q, kc, vc, cu, kv, n, _, _, _ = decode_case(B, ctx, H, K, D, page)
        bt = in_order(B, n)
        t = do_bench(lambda: A.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5), warmup=10, rep=40, return_mode="median")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            A.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5)
        tg = do_bench(g.replay, warmup=10, rep=40, return_mode="median")
        gb = 2 * B * ctx * K * D * 2 / 1e6
        out[f"decode B={B}"] = (t, gb / t, tg, gb / tg)
    L = 4096
    kc = torch.randn(L // page, page, K, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    bt = torch.arange(L // page, device="cuda", dtype=torch.int32)[None]
    q = torch.randn(L, H, D, device="cuda", dtype=DT)
    cu = torch.tensor([0, L], device="cuda", dtype=torch.int32)
    kv = torch.tensor([L], device="cuda", dtype=torch.int32)
    t = do_bench(lambda: A.attention(q, kc, vc, cu, kv, bt, L, D**-0.5), warmup=10, rep=40, return_mode="median")
    qs, ks, vs = q.transpose(0, 1)[None], kc.view(-1, K, D).transpose(0, 1)[None].contiguous(), vc.view(-1, K, D).transpose(0, 1)[None].contiguous()
    base = do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), return_mode="median")
    out["prefill L=4096"] = (t, 2 * H * L * L * D / t / 1e9, base, base / t)
    return out


CFGS = [  # KV_BLOCK, KV_SPLIT, prefill BLOCK_M, prefill warps, prefill stages
    (16, 256, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 64, 4, 3), (16, 256, 128, 8, 3),
    (64, 256, 64, 4, 3), (64, 256, 128, 8, 3), (64, 128, 128, 8, 3), (64, 64, 128, 8, 3),
    (32, 128, 128, 8, 3), (64, 256, 128, 8, 2), (64, 256, 128, 4, 3), (128, 256, 128, 8, 2),
]

def in_order(B: int, n: int) -> torch.Tensor:
    """The block table of decode_case's caches: sequence b on pages b * n .. b * n + n - 1."""
    return torch.arange(B * n, device="cuda", dtype=torch.int32).view(B, n)


def decode_case(B: int, ctx: int, H: int = 16, K: int = 8, D: int = 128, page: int = 64):
    """One decode step's inputs (B sequences at ctx tokens, pages of `page` in order), the same
    KV laid out contiguously for SDPA ([B, K, ctx, D]), and the KV bytes the step reads (MB)."""
    n = -(-ctx // page)
    kc = torch.randn(B * n, page, K, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    q = torch.randn(B, H, D, device="cuda", dtype=DT)
    cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    kv = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    ks = kc.view(B, n * page, K, D)[:, :ctx].transpose(1, 2).contiguous()
    vs = vc.view(B, n * page, K, D)[:, :ctx].transpose(1, 2).contiguous()
    return q, kc, vc, cu, kv, n, ks, vs, 2 * B * ctx * K * D * 2 / 1e6


def decode_programs():
    """Decode (0.6B heads: 16 q, 8 kv, D 128) from a CUDA graph for each DECODE_PROGRAMS, block
    tables as wide as max_model_len 4096 and 40960 allow; bits must not change; SDPA on the same
    KV laid out contiguously is the peer."""
    H, K, D, page = 16, 8, 128, 64
    res = []
    for B, ctx in ((8, 544), (8, 4096), (64, 544), (64, 1024), (64, 4096), (128, 1024), (256, 544), (256, 1024)):
        q, kc, vc, cu, kv, n, ks, vs, gb = decode_case(B, ctx, H, K, D, page)
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True),
                        return_mode="median")
        ref = None
        for width in (4096 // page, 40960 // page):
            bt = torch.zeros(B, width, device="cuda", dtype=torch.int32)
            bt[:, :n] = in_order(B, n)
            for progs in (1, 264, 528, 1024, 2048, 1 << 30):
                A.DECODE_PROGRAMS = progs
                o = A.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5)
                same = ref is None or torch.equal(o, ref)
                ref = o if ref is None else ref
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    A.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5)
                tg = do_bench(g.replay, warmup=10, rep=40, return_mode="median")
                del g
                res.append(dict(B=B, ctx=ctx, width=width, programs=progs, same=same, graph_ms=tg, gb_s=gb / tg,
                                sdpa_ms=sdpa, x_sdpa=sdpa / tg))
                print(f"B={B:4} ctx={ctx:5} width={width:4} programs={progs:10} same={int(same)} graph {tg * 1e3:7.1f} us "
                      f"{gb / tg:6.0f} GB/s  sdpa {sdpa * 1e3:7.1f} us ({sdpa / tg:.2f}x)", flush=True)
    return res


DEFAULT_TILES = A._PREFILL_TILES[DT], A._PREFILL_TILES_TMA[DT]


def set_prefill_tile(bm: int, w: int = 0, st: int = 0) -> None:
    """The prefill tile (BLOCK_M, warps, stages) of both walks (K/V by pointers and by TMA);
    bm 0: each walk's own rule."""
    A._PREFILL_TILES[DT], A._PREFILL_TILES_TMA[DT] = DEFAULT_TILES if bm == 0 else (((bm, w, st),),) * 2

PREFILL_CFGS = [  # KV_BLOCK, prefill BLOCK_M (0: the default rule), warps, stages (KV_SPLIT stays 256)
    (64, 0, 0, 0), (64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 4),
]
PREFILL_TALL = [  # --prefill --tall: the default against 2-stage and 256-row tiles (8B: 64 tokens a tile)
    (64, 0, 0, 0), (64, 128, 8, 2), (64, 128, 8, 4), (64, 256, 16, 2), (64, 256, 16, 3), (64, 256, 8, 2),
]


def packed_check() -> list[str]:
    bad = []
    g = torch.Generator(device="cuda").manual_seed(9)
    H, K, D = 16, 8, 128
    lens = [700, 1, 64, 333]
    T = sum(lens)
    q = torch.randn(T, H, D, generator=g, device="cuda").to(DT)
    k = torch.randn(T, K, D, generator=g, device="cuda").to(DT)
    v = torch.randn(T, K, D, generator=g, device="cuda").to(DT)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    lse = torch.empty(H, T, device="cuda")
    out = A.packed_attention(q, k, v, cu, max(lens), D**-0.5, lse_HT=lse)
    for b, n in enumerate(lens):
        lo = int(cu[b])
        for page in (16, 64):
            kc, vc, pages = paged(k[lo: lo + n], v[lo: lo + n], page, g)
            if not torch.equal(attn(q[lo: lo + n], kc, vc, [(n, n, pages)], D**-0.5), out[lo: lo + n]):
                bad.append(f"packed seq {b} vs paged (page {page})")
            # decode rows: the fp32 LSE shows any rounding the bf16 output would hide
            rows = [lo + t for t in (0, 63, 64, 200, 255, 256, 511, n - 1) if t < n]
            cu_d = torch.arange(len(rows) + 1, dtype=torch.int32, device="cuda")
            kv_d = torch.tensor([t - lo + 1 for t in rows], dtype=torch.int32, device="cuda")
            lse_d = torch.empty(H, len(rows), device="cuda")
            o_d = A.attention(q[rows], kc, vc, cu_d, kv_d, pages[None].expand(len(rows), -1).contiguous(), 1,
                              D**-0.5, lse_HT=lse_d)
            if not torch.equal(o_d, out[rows]) or not torch.equal(lse_d, lse[:, rows]):
                bad.append(f"decode rows of seq {b} vs packed (page {page}: output or LSE)")
    return bad


def _graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: the kernels' time, not the host's (a 1k
    attention takes ~40 us, about what one eager call costs the host)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median")


def prefill_timings() -> dict:
    out = {}
    for name, (H, K) in (("0.6b", (16, 8)), ("8b", (32, 8))):
        for L in (1024, 4096, 16384):
            D = 128
            q = torch.randn(L, H, D, device="cuda", dtype=DT)
            k = torch.randn(L, K, D, device="cuda", dtype=DT)
            v = torch.randn(L, K, D, device="cuda", dtype=DT)
            cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
            lse = torch.empty(H, L, device="cuda")
            t = _graph_ms(lambda: A.packed_attention(q, k, v, cu, L, D**-0.5, lse_HT=lse))
            fl = _graph_ms(lambda: torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, L, L, 0.0, True, False,
                                                                           scale=D**-0.5))
            tflops = 2 * H * L * L * D / t / 1e9  # causal: half of 4 * H * L^2 * D
            out[f"{name} L={L}"] = dict(ms=t, flash_ms=fl, x_flash=fl / t, tflops=tflops)
    return out


def fmt_prefill(tm: dict) -> str:
    """prefill_timings() as one line: us, x flash, TFLOP/s per shape."""
    return " ".join(f"{k}: {v['ms'] * 1e3:.0f}us {v['x_flash']:.2f}x {v['tflops']:.0f}TF" for k, v in tm.items())


def prefill_sweep(path: str) -> None:
    res = []
    for kvb, bm, w, st in PREFILL_TALL if "--tall" in sys.argv else PREFILL_CFGS:
        A.KV_BLOCK, A.KV_SPLIT = kvb, 256
        set_prefill_tile(bm, w, st)
        try:
            bad = check() + packed_check()
            tm = prefill_timings()
        except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is a row too
            print(kvb, bm, w, st, "ERROR", str(e)[:200], flush=True)
            res.append(dict(cfg=[kvb, bm, w, st], error=str(e)[:500]))
            continue
        res.append(dict(cfg=[kvb, bm, w, st], bad=bad, t=tm))
        print(f"KV_BLOCK={kvb:3} BM={bm or 'rule':>4} w={w} s={st} bits_ok={int(not bad)} "
              + " ".join(f"{k}: {v['ms'] * 1e3:.0f}us {v['x_flash']:.2f}x" for k, v in tm.items())
              + (f" BAD {bad[:3]}" if bad else ""), flush=True)
        json.dump(res, open(path, "w"), indent=1)


DECODE_TILES = [  # decode tile BLOCK_M, warps, stages (the first: the current default; 2026-12-02 sixth run
    (64, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 2), (64, 8, 3),  # also swept BM 16 / 32: other bits, rejected)
]


def decode_tile_check() -> list[str]:
    """Decode rows of one 1,100-token sequence, in a batch of 256 (one program per row and kv
    head) and of 16 (split-parallel), vs the packed prefill: output and fp32 LSE bitwise."""
    bad = []
    g = torch.Generator(device="cuda").manual_seed(11)
    H, K, D, L, page = 16, 8, 128, 1100, 64
    q = torch.randn(L, H, D, generator=g, device="cuda").to(DT)
    k = torch.randn(L, K, D, generator=g, device="cuda").to(DT)
    v = torch.randn(L, K, D, generator=g, device="cuda").to(DT)
    lse = torch.empty(H, L, device="cuda")
    full = A.packed_attention(q, k, v, torch.tensor([0, L], dtype=torch.int32, device="cuda"), L, D**-0.5, lse_HT=lse)
    kc, vc, pages = paged(k, v, page, g)
    for n in (256, 16):
        rows = torch.linspace(0, L - 1, n).long().tolist()
        lse_d = torch.empty(H, n, device="cuda")
        o = A.attention(q[rows], kc, vc, torch.arange(n + 1, dtype=torch.int32, device="cuda"),
                        torch.tensor([t + 1 for t in rows], dtype=torch.int32, device="cuda"),
                        pages[None].expand(n, -1).contiguous(), 1, D**-0.5, lse_HT=lse_d)
        if not torch.equal(o, full[rows]) or not torch.equal(lse_d, lse[:, rows]):
            bad.append(f"decode batch {n} vs packed prefill (output or LSE)")
    return bad


def decode_tiles(path: str) -> None:
    """Each 64-row decode tile (DECODE_TILE "rows"): bits first (check(), decode_tile_check()),
    then decode (0.6B heads, pages of 64) from CUDA graphs vs SDPA over the same KV laid out contiguously."""
    H, K, D, page = 16, 8, 128, 64
    res = []
    A.DECODE_TILE = "rows"  # the tile this sweep shapes
    for bm, w, st in DECODE_TILES:
        A._BLOCK_M[DT], A._DECODE_LAUNCH[DT] = bm, (w, st)
        try:
            bad = check() + decode_tile_check()
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row too
            print(bm, w, st, "ERROR", str(e)[:200], flush=True)
            res.append(dict(cfg=[bm, w, st], error=str(e)[:500]))
            continue
        rows = []
        for B, ctx in ((8, 544), (64, 192), (64, 544), (64, 4096), (256, 192), (256, 544), (256, 1024)):
            q, kc, vc, cu, kv, n, ks, vs, gb = decode_case(B, ctx, H, K, D, page)
            bt = in_order(B, n)
            t = _graph_ms(lambda: A.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5))
            sdpa = _graph_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True))
            rows.append(dict(B=B, ctx=ctx, us=t * 1e3, gb_s=gb / t, sdpa_us=sdpa * 1e3, x_sdpa=sdpa / t))
        res.append(dict(cfg=[bm, w, st], bad=bad, t=rows))
        print(f"decode tile BM={bm:3} w={w} s={st} bits_ok={int(not bad)} "
              + " ".join(f"B{r['B']}/{r['ctx']}: {r['us']:.0f}us {r['gb_s']:.0f}GB/s {r['x_sdpa']:.2f}x" for r in rows)
              + (f" BAD {bad[:3]}" if bad else ""), flush=True)
        json.dump(res, open(path, "w"), indent=1)


ROW_SUMS = A.ROW_SUMS
DECODE_PROGRAMS = A.DECODE_PROGRAMS


def _modes() -> list[str]:
    if "--modes" not in sys.argv:
        return list(ROW_SUMS)
    modes = sys.argv[sys.argv.index("--modes") + 1].split(",")
    if bad := [m for m in modes if m not in ROW_SUMS]:
        sys.exit(f"attn_sweep.py --modes: unknown row sum(s) {bad}; choose from {', '.join(ROW_SUMS)}")
    return modes


def rowsum(path: str) -> None:
    """The kernel with each ROW_SUM: its bits checks (prefill == chunked == decode, packed ==
    paged) and the training forward vs flash; then decode at 0.6B / 8B heads in the 64-row
    tile and, with a shared row sum, in the swapped tile (DECODE_TILE "swapped",
    decode_attention.py): same bits (also with 4x sharper scores) and time, SDPA the peer;
    the last shared mode's swapped tile also at 1024 / 2048 decode programs."""
    res = dict(prefill={}, decode=[])
    modes = _modes()
    shared = [m for m in modes if m != "reduce"]
    defaults = A.ROW_SUM, A.DECODE_TILE
    A.DECODE_TILE = "rows"  # each tile by name below
    for mode in modes:
        A.ROW_SUM = mode
        bad = check() + packed_check() + decode_tile_check()
        if mode != "reduce":  # decode and verify chunks in the swapped tile: the same bits
            A.DECODE_TILE = "swapped"
            bad += [f"swapped: {b}" for b in check() + decode_tile_check()]
            A.DECODE_TILE = "rows"
        tm = prefill_timings()
        res["prefill"][mode] = dict(bad=bad, t=tm)
        print(f"ROW_SUM={mode:6} bits_ok={int(not bad)} "
              + " ".join(f"{k}: {v['ms'] * 1e3:.0f}us {v['x_flash']:.2f}x" for k, v in tm.items())
              + (f" BAD {bad[:3]}" if bad else ""), flush=True)
        json.dump(res, open(path, "w"), indent=1)
    if "--prefill-only" in sys.argv:
        A.ROW_SUM, A.DECODE_TILE = defaults
        return
    run = lambda q, kc, vc, cu, kv, bt: A.attention(q, kc, vc, cu, kv, bt, 1, 128**-0.5)  # noqa: E731
    for name, (H, K) in (("0.6b", (16, 8)), ("8b", (32, 8))):
        for B, ctx in ((8, 544), (64, 192), (64, 544), (64, 4096), (256, 192), (256, 544), (256, 1024), (256, 2048)):
            q, kc, vc, cu, kv, n, ks, vs, gb = decode_case(B, ctx, H, K, 128, 64)
            bt = in_order(B, n)
            row = dict(model=name, B=B, ctx=ctx, gb=gb, sdpa_us=_graph_ms(
                lambda: F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True)) * 1e3)
            for mode in modes:
                A.ROW_SUM = mode
                for tile in ("rows", "swapped") if mode != "reduce" else ("rows",):
                    A.DECODE_TILE = tile
                    row[f"{tile}_{mode}_us"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
                    if tile == "swapped":
                        # more split programs: evener waves at 3 programs an SM?
                        for progs in (1024, 2048) if mode == shared[-1] else ():
                            A.DECODE_PROGRAMS = progs
                            row[f"swapped_{mode}_p{progs}_us"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
                            A.DECODE_PROGRAMS = DECODE_PROGRAMS
                        for sharp in (1.0, 4.0):
                            o2 = run(q * sharp, kc, vc, cu, kv, bt)
                            A.DECODE_TILE = "rows"
                            row[f"same_{mode}_x{sharp:g}"] = torch.equal(run(q * sharp, kc, vc, cu, kv, bt), o2)
                            A.DECODE_TILE = "swapped"
                A.DECODE_TILE = "rows"
            res["decode"].append(row)
            print(f"{name} B={B:3} ctx={ctx:4} sdpa {row['sdpa_us']:6.1f}  rows ({'/'.join(modes)}) "
                  + " / ".join(f"{row[f'rows_{m}_us']:6.1f}" for m in modes) + f"  swapped ({'/'.join(shared)}) "
                  + " / ".join(f"{row[f'swapped_{m}_us']:6.1f}" for m in shared)
                  + (f" ({shared[-1]} at 1024 / 2048 programs " + " / ".join(
                      f"{row[f'swapped_{shared[-1]}_p{p}_us']:6.1f}" for p in (1024, 2048)) + ")" if shared else "")
                  + " us  same " + " ".join(f"{k[5:]}={int(v)}" for k, v in row.items() if k.startswith("same_")),
                  flush=True)
            json.dump(res, open(path, "w"), indent=1)
    A.ROW_SUM, A.DECODE_TILE = defaults


WALK_TILES = [(0, 0, 0), (128, 8, 2), (128, 8, 4)]  # --walk --tiles: prefill (BLOCK_M, warps, stages); 0: the rule
WALK_DECODE = [(64, 1024), (64, 4096), (256, 544), (256, 1024), (256, 2048)]  # (B, ctx): one program a pair


def same_forward(set_way, ways: tuple, label: str) -> dict:
    """The training forward's output and LSE under each of two ways (set_way(w) for w in ways)
    compared bitwise at 0.6B 16k and 8B 4k / 777 heads; set_way(ways[-1]) stays."""
    same = {}
    g = torch.Generator(device="cuda").manual_seed(3)
    for name, (H, K), L in (("0.6b", (16, 8), 16384), ("8b", (32, 8), 4096), ("8b", (32, 8), 777)):
        q, k, v = (torch.randn(L, n, 128, generator=g, device="cuda").to(DT) for n in (H, K, K))
        cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        outs = []
        for w in ways:
            set_way(w)
            lse = torch.empty(H, L, device="cuda")
            outs.append((A.packed_attention(q, k, v, cu, L, 128**-0.5, lse_HT=lse), lse))
        same[f"{name} L={L}"] = ok = bool(torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]))
        print(f"{name} L={L}: {label} (output and LSE) {ok}", flush=True)
    return same


def walk(path: str) -> None:
    """WALK "splits" then "one" (the splits in one loop): the bits checks, the two walks'
    training forward outputs and LSEs compared bitwise at 0.6B / 8B heads up to 16k, the
    forward vs flash (per prefill tile of WALK_TILES with --tiles), and decode where one
    program walks a pair's splits (B x 8 kv heads >= DECODE_PROGRAMS) in both decode tiles
    (bits: one == splits == the 64-row tile; us, SDPA the peer)."""
    res = dict(same={}, t=[], decode=[])
    defaults = A.WALK, A.DECODE_TILE
    res["same"] = same_forward(lambda w: setattr(A, "WALK", w), ("splits", "one"), "one == splits")
    run = lambda q, kc, vc, cu, kv, bt: A.attention(q, kc, vc, cu, kv, bt, 1, 128**-0.5)  # noqa: E731
    for B, ctx in WALK_DECODE:
        q, kc, vc, cu, kv, n, ks, vs, gb = decode_case(B, ctx)
        bt = in_order(B, n)
        row = dict(B=B, ctx=ctx, mb=gb, sdpa_us=_graph_ms(
            lambda: F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True)) * 1e3)
        outs = []
        for tile in ("rows", "swapped"):
            A.DECODE_TILE = tile
            for w in ("splits", "one"):
                A.WALK = w
                outs.append(run(q, kc, vc, cu, kv, bt))
                row[f"{tile}_{w}_us"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
        row["same"] = same = all(torch.equal(outs[0], o) for o in outs[1:])
        res["decode"].append(row)
        print(f"decode B={B:3} ctx={ctx:4} ({gb:.0f} MB) sdpa {row['sdpa_us']:6.1f} us  rows splits/one "
              f"{row['rows_splits_us']:6.1f} / {row['rows_one_us']:6.1f}  swapped splits/one "
              f"{row['swapped_splits_us']:6.1f} / {row['swapped_one_us']:6.1f} "
              f"({gb / row['swapped_one_us'] * 1e3:.2f} TB/s)"
              f"  same {int(same)}", flush=True)
        json.dump(res, open(path, "w"), indent=1)
    A.DECODE_TILE = defaults[1]
    for bm, w, st in WALK_TILES if "--tiles" in sys.argv else WALK_TILES[:1]:
        set_prefill_tile(bm, w, st)
        for mode in ("splits", "one"):
            A.WALK = mode
            bad = check() + packed_check()
            tm = prefill_timings()
            res["t"].append(dict(walk=mode, tile=[bm, w, st], bad=bad, t=tm))
            print(f"walk={mode:6} tile={bm or 'rule'},{w},{st} bits_ok={int(not bad)} "
                  + fmt_prefill(tm)
                  + (f" BAD {bad[:3]}" if bad else ""), flush=True)
            json.dump(res, open(path, "w"), indent=1)
    A.WALK, A.DECODE_TILE = defaults
    set_prefill_tile(0)


TMA_TILES = [(0, 0, 0), (128, 8, 3), (128, 8, 4), (64, 4, 2), (64, 4, 4)]  # --tma: (BLOCK_M, warps, stages); 0: rule
SPLIT_COST = [256, 512, 1024, 16384]  # --tma: KV_SPLIT, forward timing only (256 gives our bits)


def tma(path: str) -> None:
    """The training forward reading packed K/V by pointers vs TMA descriptors (KV_TMA): the
    bits checks (packed == paged == decode, packed sequences back to back), both outputs and
    LSEs compared bitwise at 0.6B 16k and 8B 4k / 777, then the forward vs flash (per prefill
    tile of TMA_TILES with --tiles); last, what the split merges cost: the forward at each KV_SPLIT of
    SPLIT_COST (timing only: any split but KV_SPLIT's own gives other bits)."""
    res = dict(same={}, t=[], split=[])
    defaults = A.KV_TMA, A.KV_SPLIT
    res["same"] = same_forward(lambda on: setattr(A, "KV_TMA", on), (False, True), "tma == pointers")
    for bm, w, st in TMA_TILES if "--tiles" in sys.argv else TMA_TILES[:1]:
        set_prefill_tile(bm, w, st)
        for on in (False, True):
            A.KV_TMA = on
            try:
                bad = check() + packed_check()
                tm = prefill_timings()
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is a row too
                print(f"tma={int(on)} tile={bm or 'rule'},{w},{st} ERROR {str(e)[:200]}", flush=True)
                continue
            res["t"].append(dict(tma=on, tile=[bm, w, st], bad=bad, t=tm))
            print(f"tma={int(on)} tile={bm or 'rule'},{w},{st} bits_ok={int(not bad)} "
                  + fmt_prefill(tm)
                  + (f" BAD {bad[:3]}" if bad else ""), flush=True)
            json.dump(res, open(path, "w"), indent=1)
    A.KV_TMA = defaults[0]
    set_prefill_tile(0)
    for split in SPLIT_COST:
        A.KV_SPLIT = split
        tm = prefill_timings()
        res["split"].append(dict(kv_split=split, t=tm))
        print(f"KV_SPLIT={split:5} " + fmt_prefill(tm), flush=True)
        json.dump(res, open(path, "w"), indent=1)
    A.KV_SPLIT = defaults[1]


TMA_PAGED_PREFILL = [(1, 4096), (8, 1024), (64, 128)]  # --tma-paged: (sequences, prompt) of an engine prefill


def tma_paged(path: str) -> None:
    """The engine's paged attention reading the caches by TMA (PAGED_KV_TMA) vs pointers: the
    bits checks with it on, then decode at SWAPPED_SHAPES (the default tile, and the 64-row tile
    at B 8) and a paged prefill of TMA_PAGED_PREFILL (0.6B heads, pages of 64, the tile rule of
    each way), each compared bitwise between the two ways and timed from graphs."""
    res = dict(bad=[], decode=[], prefill=[])
    saved = A.PAGED_KV_TMA, A.DECODE_TILE
    A.PAGED_KV_TMA = dict.fromkeys(saved[0], True)
    res["bad"] = check() + packed_check()
    print(f"PAGED_KV_TMA on: bits_ok={int(not res['bad'])} {res['bad'][:3]}", flush=True)
    run = lambda q, kc, vc, cu, kv, bt, n: A.attention(q, kc, vc, cu, kv, bt, n, 128**-0.5)  # noqa: E731

    def both(row, args, n):
        outs = []
        for on in (False, True):
            A.PAGED_KV_TMA = dict.fromkeys(saved[0], on)
            outs.append(run(*args, n))
            row[f"{'tma' if on else 'ptr'}_us"] = _graph_ms(lambda: run(*args, n)) * 1e3
        row["same"] = bool(torch.equal(*outs))

    for B, ctx in SWAPPED_SHAPES:
        q, kc, vc, cu, kv, n, _, _, mb = decode_case(B, ctx)
        for tile in ("auto", "rows") if B == 8 else ("auto",):
            A.DECODE_TILE = tile
            row = dict(B=B, ctx=ctx, mb=mb, tile=tile)
            both(row, (q, kc, vc, cu, kv, in_order(B, n)), 1)
            res["decode"].append(row)
            print(f"decode B={B:3} ctx={ctx:4} {tile:5} pointers {row['ptr_us']:6.1f} us  TMA {row['tma_us']:6.1f} us "
                  f"({mb / row['tma_us']:.2f} TB/s)  same {int(row['same'])}", flush=True)
            json.dump(res, open(path, "w"), indent=1)
    A.DECODE_TILE = saved[1]
    for B, L in TMA_PAGED_PREFILL:
        q, kc, vc, _, kv, n, _, _, _ = decode_case(B, L)
        q = torch.randn(B * L, 16, 128, device="cuda", dtype=DT)
        cu = torch.arange(B + 1, device="cuda", dtype=torch.int32) * L
        row = dict(B=B, L=L)
        both(row, (q, kc, vc, cu, kv, in_order(B, n)), L)
        res["prefill"].append(row)
        print(f"prefill {B:3} x {L:5} pointers {row['ptr_us']:7.1f} us  TMA {row['tma_us']:7.1f} us "
              f"({row['ptr_us'] / row['tma_us']:.2f}x)  same {int(row['same'])}", flush=True)
        json.dump(res, open(path, "w"), indent=1)
    A.PAGED_KV_TMA = saved[0]


# --swapped-launch: (num_warps, num_stages); (4, 1) faults with an illegal address (2026-12-03)
SWAPPED_LAUNCHES = [(4, 2), (4, 3), (4, 4), (8, 2), (4, 3, 168), (4, 2, 128), (4, 3, 128)]  # (warps, stages[, maxnreg])
SWAPPED_SHAPES = [(8, 544), (8, 4096), (64, 192), (64, 544), (64, 1024), (64, 4096), (128, 544), (128, 1024),
                  (256, 192), (256, 1024)]


def _decode_row(B: int, ctx: int, H: int = 16):
    """decode_case's paged inputs (q, caches, cu, kv lens, block table) and a result row with SDPA's time
    over the same K/V laid out contiguously."""
    q, kc, vc, cu, kv, n, ks, vs, mb = decode_case(B, ctx, H)
    row = dict(B=B, ctx=ctx, H=H, mb=mb, t={}, sdpa_us=_graph_ms(
        lambda: F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True)) * 1e3)
    return (q, kc, vc, cu, kv, in_order(B, n)), row


def _launch_name(launch: tuple, walk: str) -> str:
    return f"{launch[0]}w{launch[1]}s" + (f"{launch[2]}r" if len(launch) > 2 else "") + f"_{walk}"


def swapped_launch(path: str) -> None:
    """The swapped decode tile at each (num_warps, num_stages) of SWAPPED_LAUNCHES and each WALK,
    0.6B heads (8 kv heads) at the engine's batches and contexts: us, TB/s, and bits equal
    to the 64-row tile's (stages and walks reorder no arithmetic); SDPA the peer."""
    res = []
    defaults = A.WALK, A.DECODE_TILE, A._SWAPPED_LAUNCH
    run = lambda q, kc, vc, cu, kv, bt: A.attention(q, kc, vc, cu, kv, bt, 1, 128**-0.5)  # noqa: E731
    for B, ctx in SWAPPED_SHAPES:
        (q, kc, vc, cu, kv, bt), row = _decode_row(B, ctx)
        mb = row["mb"]
        A.DECODE_TILE = "rows"
        ref = run(q, kc, vc, cu, kv, bt)
        row["rows_us"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
        A.DECODE_TILE = "swapped"
        same = True
        for launch in SWAPPED_LAUNCHES:
            A._SWAPPED_LAUNCH = launch
            for w in ("splits", "one"):
                A.WALK = w
                try:
                    same &= bool(torch.equal(run(q, kc, vc, cu, kv, bt), ref))
                    row["t"][_launch_name(launch, w)] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
                except Exception as e:  # noqa: BLE001 - a launch that does not fit (shared memory) is a row too
                    row["t"][_launch_name(launch, w)] = str(e)[:200]
        row["same"] = same
        res.append(row)
        best = min([(v, k) for k, v in row["t"].items() if isinstance(v, float)] or [(float("nan"), "none")])
        print(f"B={B:3} ctx={ctx:4} ({mb:5.0f} MB) sdpa {row['sdpa_us']:6.1f} rows {row['rows_us']:6.1f}  best "
              f"{best[1]} {best[0]:6.1f} us ({mb / best[0]:.2f} TB/s)  same {int(same)}  "
              + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}=ERR" for k, v in row["t"].items()),
              flush=True)
        json.dump(res, open(path, "w"), indent=1)
    A.WALK, A.DECODE_TILE, A._SWAPPED_LAUNCH = defaults


PAIRS_SHAPES = [(32, 192), (64, 64), (64, 128), (64, 192), (64, 384), (64, 544), (64, 1024), (64, 4096), (128, 192),
                (128, 1024), (256, 192), (256, 1024), (64, 192, 32), (64, 1024, 32)]  # (B, ctx[, q heads: 8B's])


def pairs_sweep(path: str) -> None:
    """The swapped decode tile with one and two (sequence, kv head) pairs a program (DECODE_PAIRS, at any
    pair count here), at 2 and 3 stages, 0.6B heads (and 8B's, 32 q heads): us, TB/s, bits equal to one
    pair a program's; SDPA over the same K/V laid out contiguously the peer. Then a line fitted to the
    shipped launch's time at B 64 (0.6B heads) at the short contexts (ctx <= 384): us a launch that no
    block removes (the intercept) and us per 64 tokens of context (the slope), and the same for SDPA."""
    res = []
    defaults = A.DECODE_PAIRS, A.DECODE_PAIRS_MIN, A.DECODE_PAIRS_MAX, A._SWAPPED_LAUNCH
    run = lambda q, kc, vc, cu, kv, bt: A.attention(q, kc, vc, cu, kv, bt, 1, 128**-0.5)  # noqa: E731
    for B, ctx, *H in PAIRS_SHAPES:
        (q, kc, vc, cu, kv, bt), row = _decode_row(B, ctx, *H)
        mb = row["mb"]
        A.DECODE_PAIRS, A.DECODE_PAIRS_MIN, A.DECODE_PAIRS_MAX, A._SWAPPED_LAUNCH = defaults
        ref = run(q, kc, vc, cu, kv, bt)
        row["shipped_us"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
        same = True
        for pairs in (1, 2):
            for stages in (2, 3):
                A.DECODE_PAIRS, A._SWAPPED_LAUNCH = pairs, (4, stages)
                A.DECODE_PAIRS_MIN, A.DECODE_PAIRS_MAX = 1, 1 << 30
                same &= bool(torch.equal(run(q, kc, vc, cu, kv, bt), ref))
                row["t"][f"{pairs}p{stages}s"] = _graph_ms(lambda: run(q, kc, vc, cu, kv, bt)) * 1e3
        row["same"] = same
        res.append(row)
        print(f"B={B:3} ctx={ctx:4} H={row['H']} ({mb:5.1f} MB) sdpa {row['sdpa_us']:6.1f} shipped "
              f"{row['shipped_us']:6.1f} us "
              f"({mb / row['shipped_us']:.2f} TB/s)  " + " ".join(f"{k}={v:.1f}" for k, v in row["t"].items())
              + f"  same {int(same)}", flush=True)
        json.dump({"rows": res}, open(path, "w"), indent=1)
    A.DECODE_PAIRS, A.DECODE_PAIRS_MIN, A.DECODE_PAIRS_MAX, A._SWAPPED_LAUNCH = defaults
    fit = {}
    pts = [(r["ctx"], r["shipped_us"], r["sdpa_us"]) for r in res if r["B"] == 64 and r["H"] == 16 and r["ctx"] <= 384]
    for i, name in ((1, "shipped"), (2, "sdpa")):
        slope, icpt = statistics.linear_regression([p[0] / 64 for p in pts], [p[i] for p in pts])
        fit[name] = {"us_a_launch": icpt, "us_per_64_tokens": slope}
        print(f"B=64 {name}: {icpt:.1f} us a launch + {slope:.2f} us per 64 tokens of context", flush=True)
    json.dump({"rows": res, "fit_b64": fit}, open(path, "w"), indent=1)


# flag -> sweep(OUT.json); the first listed that is given runs
SWEEPS = {"--tma-paged": tma_paged, "--tma": tma, "--swapped-launch": swapped_launch, "--walk": walk,
          "--pairs": pairs_sweep,
          "--rowsum": rowsum, "--decode-tiles": decode_tiles, "--prefill": prefill_sweep}


if __name__ == "__main__":
    for flag, sweep in SWEEPS.items():
        if flag in sys.argv:
            sweep(sys.argv[1])
            sys.exit(0)
    if "--decode" in sys.argv:
        json.dump(decode_programs(), open(sys.argv[1], "w"), indent=1)
        sys.exit(0)
    res = []
    for kvb, split, bm, w, st in CFGS:
        A.KV_BLOCK, A.KV_SPLIT = kvb, split
        set_prefill_tile(bm, w, st)
        try:
            bad = check()
            tm = timings()
        except Exception as e:  # noqa: BLE001
            print(kvb, split, bm, w, st, "ERROR", str(e)[:200], flush=True)
            continue
        res.append(dict(cfg=[kvb, split, bm, w, st], bad=bad, t=tm))
        print(f"KV_BLOCK={kvb:3} KV_SPLIT={split:3} BM={bm:3} w={w} s={st} ok={int(not bad)} "
              + " ".join(f"{k}: {v[0]:.4f}ms {v[1]:.0f} graph {v[2]:.4f} {v[3]:.2f}" for k, v in tm.items())
              + (f" BAD {bad[:3]}" if bad else ""), flush=True)
        json.dump(res, open(sys.argv[1], "w"), indent=1)
