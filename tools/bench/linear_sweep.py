"""Sweep invariant-linear tile configs on one GPU: bitwise check vs the reference tile, then time.

    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --out sweep.json
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which cold --out cold.json  # decode, w out of L2
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which unroll --out unroll.json  # Tile.k_unroll
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which mid_cold --out mid.json  # M 128-512
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which upper --out upper.json  # M 256-2048, wide tiles
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which stages --out stages.json  # M 128-512, 4 vs 5
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which warps --out warps.json  # M 128-512, 128x64 w8
    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --which deep --out deep.json  # M 64-512, stages

Every candidate must give the reference tile's bits (same BLOCK_K walk); only those are timed,
launched from Python (ms, what eager code pays) and replayed from a CUDA graph (graph_ms, the
kernel alone, what the engine's decode graphs pay).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from miles_kernels._triton import matmul as lin

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

T = lin.Tile
REF = T(0, 128, 256, 64, 8, 8, 3)
LARGE = [(4096, 24576, 4096), (4096, 4096, 4096), (1024, 6144, 4096), (4096, 1024, 2048), (1024, 1024, 3072)]
LARGE_CFG = [
    REF, T(0, 128, 256, 64, 8, 8, 4), T(0, 128, 128, 64, 8, 4, 4), T(0, 128, 128, 64, 8, 8, 4),
    T(0, 128, 256, 64, 8, 8, 3, True), T(0, 128, 256, 64, 8, 8, 4, True), T(0, 128, 128, 64, 8, 4, 4, True),
    T(0, 128, 128, 64, 8, 8, 5, True), T(0, 256, 128, 64, 8, 8, 3, True), T(0, 64, 256, 64, 8, 4, 4, True),
]
MID = [(256, 6144, 4096), (256, 4096, 12288), (256, 24576, 4096), (256, 1024, 3072), (256, 1024, 2048)]
MID_CFG = [T(0, 64, 128, 64, 8, 4, 4), T(0, 64, 128, 64, 8, 4, 4, True), T(0, 128, 128, 64, 8, 8, 4, True),
           T(0, 64, 64, 64, 8, 4, 6), T(0, 64, 64, 64, 8, 4, 6, True), T(0, 64, 256, 64, 8, 4, 4, True)]
CHECK = [(m, n, k) for m in (1024, 4096) for (n, k) in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (4096, 4096))]
CHECK_CFG = [T(0, 128, 128, 64, 8, 8, 5), T(0, 128, 128, 64, 8, 8, 5, True), T(0, 128, 256, 64, 8, 8, 3),
             T(0, 128, 256, 64, 8, 8, 3, True)]
SMALL = [(m, n, k) for m in (1, 64) for (n, k) in ((4096, 4096), (6144, 4096), (4096, 12288), (24576, 4096), (1024, 3072),
                                                  (4096, 1024), (1024, 2048))]
SMALL_CFG = [T(0, 64, 32, 64, 1, 4, 6), T(0, 64, 16, 64, 1, 4, 8), T(0, 64, 32, 64, 1, 4, 8), T(0, 64, 64, 64, 1, 4, 6),
             T(0, 16, 32, 64, 1, 4, 8), T(0, 16, 64, 64, 1, 4, 6), T(0, 16, 16, 64, 1, 2, 10),
             T(0, 64, 32, 64, 1, 4, 8, True), T(0, 64, 64, 64, 1, 4, 6, True), T(0, 64, 16, 64, 1, 4, 10, True)]

# Engine decode and chunked prefill: 0.6B / 8B shapes (q, k|v, o, gate|up, down; qkv and gate_up as one weight) at
# the batch sizes the engine runs; the tiles keep BLOCK_K=64 and trade CTAs for reuse.
DECODE = [(m, n, k) for m in (64, 128, 256, 512) for (n, k) in (
    (2048, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (4096, 1024), (6144, 1024),
    (4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288), (6144, 4096), (24576, 4096))]
DECODE_CFG = [T(0, 64, 32, 64, 1, 4, 8), T(0, 64, 16, 64, 1, 4, 8), T(0, 64, 64, 64, 1, 4, 6), T(0, 64, 64, 64, 8, 4, 4),
              T(0, 64, 128, 64, 8, 4, 4), T(0, 128, 64, 64, 8, 4, 4), T(0, 128, 128, 64, 8, 8, 4),
              T(0, 64, 32, 64, 1, 4, 8, True), T(0, 64, 64, 64, 8, 4, 6, True), T(0, 128, 64, 64, 8, 4, 4, True),
              T(0, 128, 128, 64, 8, 8, 4, True)]

# Decode with the weights out of L2, as the engine's step reads them (each call a different copy of w,
# >= COLD_BYTES of copies): deeper pipelines (12 / 16 stages) and BLOCK_K 128 (more bytes in flight a CTA)
# against the decode tiles of today. BLOCK_K 128 keeps the bits only if the MMAs' K order is the same:
# `same` says (vs REF's BLOCK_K 64).
COLD = [(m, n, k) for m in (64, 256) for (n, k) in ((1024, 2048), (1024, 3072), (4096, 1024), (6144, 1024),
                                                    (4096, 4096), (4096, 12288), (6144, 4096), (24576, 4096))]
COLD_CFG = [T(0, 64, 16, 64, 1, 4, 8), T(0, 64, 16, 64, 1, 4, 12), T(0, 64, 16, 64, 1, 4, 16),
            T(0, 64, 32, 64, 1, 4, 8), T(0, 64, 32, 64, 1, 4, 12), T(0, 64, 32, 64, 1, 4, 16),
            T(0, 64, 64, 64, 1, 4, 6), T(0, 64, 64, 64, 1, 4, 10),
            T(0, 64, 16, 128, 1, 4, 6), T(0, 64, 16, 128, 1, 4, 8), T(0, 64, 32, 128, 1, 4, 6),
            T(0, 64, 32, 128, 1, 4, 8), T(0, 128, 64, 64, 8, 4, 4), T(0, 128, 128, 64, 8, 8, 4, True)]
COLD_BYTES = 256 << 20  # five times the H200's L2
# The cold shapes again, today's pointer tiles against the same tiles with two or four BLOCK_K steps a loop
# iteration (Tile.k_unroll: the dots and their order unchanged, so `same` must be 1), at 4-8 stages.
UNROLL_CFG = [T(0, 64, n, 64, 1, 4, s, False, u) for n in (16, 32, 64) for (u, s) in
              ((1, 8 if n < 64 else 6), (2, 4), (2, 6), (2, 8), (4, 3), (4, 4))]
# M 128-512, where the fill rule takes the 128-row TMA tiles on wide N and the 64-row ones on N 1024
# (0.61-0.91x cuBLAS at M 256 in the 2026-12-02 H200 sweep): those TMA tiles against the same tiles by
# pointers at one and two BLOCK_K steps an iteration, and the 64-row tiles at one and two (the narrow
# ones were adopted at two from M 64 / 256 reads: M 128 and 512 untimed), weights cold.
MID_COLD = [(m, n, k) for m in (128, 256, 512) for (n, k) in ((1024, 2048), (1024, 3072), (4096, 1024),
                                                               (6144, 1024), (4096, 4096), (12288, 4096))]
MID_COLD_CFG = [T(0, 128, 128, 64, 8, 8, 4, True), T(0, 128, 64, 64, 8, 4, 4, True),
                T(0, 128, 128, 64, 8, 8, 4), T(0, 128, 128, 64, 8, 8, 3, False, 2),
                T(0, 128, 64, 64, 8, 4, 4), T(0, 128, 64, 64, 8, 4, 3, False, 2), T(0, 128, 64, 64, 8, 4, 4, False, 2),
                T(0, 64, 64, 64, 1, 4, 6), T(0, 64, 64, 64, 1, 4, 4, False, 2),
                T(0, 64, 32, 64, 1, 4, 8), T(0, 64, 32, 64, 1, 4, 6, False, 2),
                T(0, 64, 16, 64, 1, 4, 8), T(0, 64, 16, 64, 1, 4, 8, False, 2)]
# M 1,024 / 2,048 (chunked prefill, short trainer micro-batches), where the M bucket's one tile (128x128 TMA)
# fills few CTAs on N 1,024 (H100 thirty-third run: 0.74-0.76x cuBLAS) and 128x256 wins on wide N (1.03x at
# 8B o): the fill rule's candidates (SMALL_M raised to 2,048 would pick among them), weights cold. M 256 / 512
# too, for the 64x128 TMA tile: at M 256 on N 12,288 the 128x128 tiles make 1.45 waves of 132 SMs (0.71x),
# 64x128 would make 2.9.
UPPER = [(m, n, k) for m in (256, 512, 1024, 2048) for (n, k) in ((1024, 2048), (1024, 3072), (4096, 1024), (6144, 1024),
                                                         (4096, 4096), (12288, 4096), (4096, 12288))]
UPPER_CFG = [T(0, 128, 256, 64, 8, 8, 3, True), T(0, 128, 128, 64, 8, 8, 5, True), T(0, 128, 128, 64, 8, 8, 4, True),
             T(0, 128, 64, 64, 8, 4, 4, True), T(0, 128, 64, 64, 8, 4, 5, True), T(0, 64, 128, 64, 8, 4, 4, True),
             T(0, 64, 64, 64, 1, 4, 6), T(0, 64, 64, 64, 8, 4, 6, True)]

# M 128-512 on the shapes still short of cuBLAS (8B: 0.70-0.86x, fifty-second run): the 128x64 TMA tile, which
# makes ~one wave at N 4,096, with two consumer warpgroups (8 warps, a 64 x 64 wgmma each) against the shipped one
# (4 warps: one warpgroup, two m64 wgmmas a k step), beside the shipped 128x128; weights cold.
WARPS = [(m, n, k) for m in (128, 256, 512) for (n, k) in ((4096, 1024), (6144, 1024), (6144, 4096), (4096, 4096),
                                                           (24576, 4096), (4096, 12288))]
# The 256-row tiles (8 warps, a 128-row half a warpgroup) read x once a column tile at M 256: half the L2 bytes a
# FLOP of the 128-row ones, at half the CTAs (gate|up at M 256: 192-384 CTAs; q|k|v, o, down 48-96). Offline
# (triton 3.6, sm_90a): 256x64 at 4 stages 196,640 B shared, 256x128 at 3 213,016 B; one stage more passes 227 KB.
WARPS_CFG = ([T(0, 128, 64, 64, 8, w, s, True) for w in (4, 8) for s in (4, 5, 6)] + [T(0, 128, 128, 64, 8, 8, 5, True)]
             + [T(0, 256, 64, 64, 8, 8, s, True) for s in (3, 4)] + [T(0, 256, 128, 64, 8, 8, 3, True)])

# M 64-512, deeper TMA pipelines: cuBLAS runs 64x64 tiles at 13 stages and 128x64 at 8 here (cublas_kernels.py,
# H100 fifty-ninth run), and the 128x64 TMA tile read 0.02-0.07 of cuBLAS faster at 6 stages than the shipped 5 on
# all 18 shapes of `warps`. The shipped pick first (linear_tile's, marked pick=1), then the 128-row TMA tiles at 5-8
# stages (128x128 at 6: 192 KB of stages) and the 64-row TMA tiles at
# up to 12 (and the 64x64 pointer tile, shipped at 6, at 9 and 12); weights cold. Only tiles with
# BLOCK_M <= max(M, 64) (the pick's own rule).
_DEEP_SHAPES = ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 4096), (4096, 4096), (24576, 4096),
                (4096, 12288))
DEEP = [(m, n, k) for m in (64, 128, 256, 512) for (n, k) in _DEEP_SHAPES]
DEEP_CFG = ([T(0, 128, 64, 64, 8, 4, s, True) for s in (5, 6, 7, 8)]
            + [T(0, 128, 128, 64, 8, 8, s, True) for s in (5, 6)]
            + [T(0, 64, 64, 64, 8, 4, s, True) for s in (6, 9, 12)] + [T(0, 64, 128, 64, 8, 4, s, True) for s in (5, 8)]
            + [T(0, 64, 32, 64, 8, 4, s, True) for s in (8, 12)] + [T(0, 64, 64, 64, 1, 4, s) for s in (9, 12)])

# M 128-512, the small-M rule's 128-row tiles at 4 and 5 stages, by TMA (linear) and by pointers (what linears and
# swiglu run for q|k|v and gate|up at M <= SMALL_M, summed N here), weights cold: 5 stages read 0.02-0.10 of cuBLAS
# faster by TMA in the H100 thirty-fourth run; the pointer launches at 5 were not timed.
STAGES = [(m, n, k) for m in (128, 256, 512) for (n, k) in ((4096, 1024), (6144, 1024), (1024, 3072), (6144, 4096),
                                                           (24576, 4096), (4096, 4096), (4096, 12288))]
STAGES_CFG = [T(0, bm, bn, 64, 8, w, s, tma) for (bm, bn, w) in ((128, 128, 8), (128, 64, 4)) for s in (4, 5)
              for tma in (False, True)]

# The trainer's 0.6B forward at 16k rows: q, k|v, gate|up one weight each and fused (qkv, gate_up), o, down.
TRAIN = [(16384, n, k) for (n, k) in ((2048, 1024), (1024, 1024), (4096, 1024), (3072, 1024), (6144, 1024),
                                       (1024, 2048), (1024, 3072))]
TRAIN_CFG = [REF._replace(tma=True), T(0, 128, 256, 64, 8, 8, 4, True), T(0, 128, 128, 64, 8, 8, 4, True),
             T(0, 128, 128, 64, 8, 8, 5, True), T(0, 256, 128, 64, 8, 8, 3, True), T(0, 128, 128, 64, 8, 4, 4, True),
             T(0, 128, 256, 64, 1, 8, 3, True)]


def _cycled(ws: list):
    """A function returning the next of ws on each call (round robin): each timed call reads a
    weight the last calls did not leave in L2."""
    at = [0]

    def nxt():
        at[0] = (at[0] + 1) % len(ws)
        return ws[at[0]]
    return nxt


def cold_weights(w: torch.Tensor):
    """_cycled over w and copies of it filling COLD_BYTES: timed calls meet their weight cold, as the
    decode step does (the probes in tools/bench use it too)."""
    return _cycled([w] + [w.clone() for _ in range(-(-COLD_BYTES // w.nbytes) - 1)])


def run(shapes, cfgs, peak, rows, cold: bool = False, pick: bool = False):
    every = cfgs
    for M, N, K in shapes:
        if pick:  # linear_tile's own pick first, then the candidates its rule would allow at M
            shipped = lin.linear_tile(M, torch.bfloat16, N, torch.device("cuda"))
            cfgs = [shipped] + [c for c in every if c.block_m <= max(M, 64) and c != shipped._replace(max_m=0)]
        torch.manual_seed(M + N + K)
        x = torch.randn(max(M, 4096), K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        ref = torch.empty(x.shape[0], N, device="cuda", dtype=torch.bfloat16)
        lin._launch_linear(x, w, None, ref, REF)
        xm = x[:M]
        wn = cold_weights(w) if cold else _cycled([w])
        base, base_graph = timings(lambda: F.linear(xm, wn()))
        for c in cfgs:
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            try:
                lin._launch_linear(xm, w, None, y, c)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - report and go on
                rows.append(dict(M=M, N=N, K=K, cfg=list(c), err=str(e)[:200]))
                print(f"M={M} N={N} K={K} {tuple(c)[1:]} ERROR {str(e)[:120]}", flush=True)
                continue
            lin._launch_linear(xm, w, None, y, c)
            same = torch.equal(y, ref[:M])
            t, t_graph = timings(lambda: lin._launch_linear(xm, wn(), None, y, c))  # noqa: B023
            dev = t_graph or t
            tf = 2 * M * N * K / dev / 1e9
            gbs = 2 * (M * K + N * K + M * N) / dev / 1e6
            rows.append(dict(M=M, N=N, K=K, cfg=list(c), pick=pick and c is cfgs[0], cold=cold, same=same, ms=t,
                             graph_ms=t_graph, base_ms=base, base_graph_ms=base_graph, tflops=tf, gbps=gbs))
            xg = f"{base_graph / t_graph:.2f}" if base_graph and t_graph else "-"
            print(f"M={M:5} N={N:6} K={K:6} bm={c.block_m:3} bn={c.block_n:3} bk={c.block_k:3} w={c.num_warps} "
                  f"s={c.num_stages:2} u={c.k_unroll} pick={int(pick and c is cfgs[0])} "
                  f"tma={int(c.tma)} same={int(same)} ms={t:.4f} x_cublas={base / t:.2f} graph_ms={dev:.4f} "
                  f"x_cublas_graph={xg} TF={tf:6.1f} GB/s={gbs:6.0f} hbm%={100 * gbs / peak:4.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--which", default="small,mid,large")
    a = ap.parse_args()
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    peak = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    del src, dst
    print(f"HBM copy peak {peak:.0f} GB/s", flush=True)
    rows = []
    for wh in a.which.split(","):
        shapes, cfgs = dict(check=(CHECK, CHECK_CFG), small=(SMALL, SMALL_CFG), mid=(MID, MID_CFG), large=(LARGE, LARGE_CFG),
                             decode=(DECODE, DECODE_CFG), train=(TRAIN, TRAIN_CFG), cold=(COLD, COLD_CFG),
                             unroll=(COLD, UNROLL_CFG), mid_cold=(MID_COLD, MID_COLD_CFG), upper=(UPPER, UPPER_CFG),
                             stages=(STAGES, STAGES_CFG), warps=(WARPS, WARPS_CFG), deep=(DEEP, DEEP_CFG))[wh]
        run(shapes, cfgs, peak, rows, cold=wh in ("cold", "unroll", "mid_cold", "upper", "stages", "warps", "deep"),
            pick=wh == "deep")
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
