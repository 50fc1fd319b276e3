"""Sweep invariant-linear tile configs on one GPU: bitwise check vs the reference tile, then time.

    PYTHONPATH=src:kernels python tools/bench/linear_sweep.py --out sweep.json
    ... --which chunked   (K-chunked weights: chunk lengths x tiles, weights rotated past L2)

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
from kernels import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

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


def run(shapes, cfgs, peak, rows):
    for M, N, K in shapes:
        torch.manual_seed(M + N + K)
        x = torch.randn(4096, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        ref = torch.empty(4096, N, device="cuda", dtype=torch.bfloat16)
        lin._launch_linear(x, w, None, ref, REF)
        xm = x[:M]
        base, base_graph = timings(lambda: F.linear(xm, w))
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
            t, t_graph = timings(lambda: lin._launch_linear(xm, w, None, y, c))  # noqa: B023
            dev = t_graph or t
            tf = 2 * M * N * K / dev / 1e9
            gbs = 2 * (M * K + N * K + M * N) / dev / 1e6
            rows.append(dict(M=M, N=N, K=K, cfg=list(c), same=same, ms=t, graph_ms=t_graph, base_ms=base,
                             base_graph_ms=base_graph, tflops=tf, gbps=gbs))
            xg = f"{base_graph / t_graph:.2f}" if base_graph and t_graph else "-"
            print(f"M={M:5} N={N:6} K={K:6} bm={c.block_m:3} bn={c.block_n:3} w={c.num_warps} s={c.num_stages:2} "
                  f"tma={int(c.tma)} same={int(same)} ms={t:.4f} x_cublas={base / t:.2f} graph_ms={dev:.4f} "
                  f"x_cublas_graph={xg} TF={tf:6.1f} GB/s={gbs:6.0f} hbm%={100 * gbs / peak:4.0f}", flush=True)


# K-chunked weights (matmul.K_CHUNKS): 0.6B o / down, 8B k|v and a 2048-wide one, at decode and training M;
# each chunk length is its own numerics, so every tile is checked against that length's first tile.
CHUNKED = [(m, n, k) for (n, k) in ((1024, 2048), (1024, 3072), (1024, 4096), (2048, 4096))
           for m in (64, 128, 256, 512, 1024, 4096, 16384)]
CHUNK_LENS = (256, 512, 1024)
SPLIT_CFG = [T(0, 64, 16, 64, 1, 4, 8, False, True), T(0, 64, 32, 64, 1, 4, 8, False, True),
             T(0, 64, 64, 64, 1, 4, 6, False, True), T(0, 128, 64, 64, 8, 4, 4, False, True),
             T(0, 128, 128, 64, 8, 8, 4, False, True), T(0, 64, 32, 64, 1, 4, 8), T(0, 64, 16, 64, 1, 4, 8)]
BIG_CFG = [T(0, 128, 128, 64, 8, 8, 4, True), T(0, 128, 128, 64, 8, 8, 5, True), T(0, 128, 128, 64, 8, 4, 4, True),
           T(0, 128, 64, 64, 8, 4, 4, True), T(0, 128, 256, 64, 8, 8, 3, True), T(0, 128, 128, 64, 8, 8, 4)]
ROTATE_BYTES = 256 << 20  # weights cycled per call so each read comes from HBM, not L2 (as in a model)


def _rotated(fn_of, ws):
    state = [0]

    def call():
        state[0] = (state[0] + 1) % len(ws)
        return fn_of(ws[state[0]])

    return call


def run_chunked(peak, rows):
    saved = dict(lin.K_CHUNKS)
    for M, N, K in CHUNKED:
        torch.manual_seed(M + N + K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
              for _ in range(max(1, ROTATE_BYTES // (2 * N * K)))]
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        dev = lambda f: (lambda t: t[1] or t[0])(timings(f))  # noqa: E731
        base = dev(_rotated(lambda w: F.linear(x, w), ws))
        lin.K_CHUNKS.clear()  # the plain K walk, the op's own tile: what this shape ran before
        old = dev(_rotated(lambda w: lin.linear(x, w), ws))
        head = dict(M=M, N=N, K=K, cublas_ms=base, plain_ms=old)
        print(f"M={M:5} N={N:5} K={K:5} cublas={base * 1e3:8.1f}us plain(op)={old * 1e3:8.1f}us", flush=True)
        for kc in CHUNK_LENS:
            lin.K_CHUNKS.update({dt: lin.KChunks(4096, 0, kc) for dt in (torch.bfloat16, torch.float16)})
            pick = lin.linear_tile(M, torch.bfloat16, N, x.device, K)
            t_pick = dev(_rotated(lambda w: lin.linear(x, w), ws))
            ref = lin.linear(x, ws[0])
            print(f"   kc={kc:5} op pick {tuple(pick)[1:]} {t_pick * 1e3:8.1f}us x_cublas={base / t_pick:.2f} "
                  f"x_plain={old / t_pick:.2f}", flush=True)
            rows.append(dict(head, kc=kc, cfg=list(pick), pick=True, ms=t_pick))
            for c in (SPLIT_CFG if M <= lin.SMALL_M else BIG_CFG):
                try:
                    lin._launch_linear(x, ws[0], None, y, c)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - report and go on
                    rows.append(dict(head, kc=kc, cfg=list(c), err=str(e)[:300]))
                    print(f"   kc={kc:5} {tuple(c)[1:]} ERROR {str(e)[:200]}", flush=True)
                    continue
                same = torch.equal(y, ref)
                t = dev(_rotated(lambda w: lin._launch_linear(x, w, None, y, c), ws))  # noqa: B023
                gbs = 2 * (M * K + N * K + M * N) / t / 1e6
                rows.append(dict(head, kc=kc, cfg=list(c), same=same, ms=t, gbps=gbs))
                print(f"   kc={kc:5} {tuple(c)[1:]} same={int(same)} {t * 1e3:8.1f}us x_cublas={base / t:.2f} "
                      f"x_plain={old / t:.2f} TF={2 * M * N * K / t / 1e9:6.1f} hbm%={100 * gbs / peak:4.0f}", flush=True)
        lin.K_CHUNKS.clear()
        lin.K_CHUNKS.update(saved)
        del ws


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
        if wh == "chunked":
            run_chunked(peak, rows)
            json.dump(rows, open(a.out, "w"), indent=1)
            continue
        shapes, cfgs = dict(check=(CHECK, CHECK_CFG), small=(SMALL, SMALL_CFG), mid=(MID, MID_CFG), large=(LARGE, LARGE_CFG),
                             decode=(DECODE, DECODE_CFG))[wh]
        run(shapes, cfgs, peak, rows)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
