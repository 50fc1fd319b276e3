"""Multi-part tiles for the small-M linears' wave tails: whether a 192-wide (or 192-tall) tile pays.

At M 256-512 on N 6,144 the small-M rule picks 128x128, whose grid makes 1.45 waves on 132 SMs (0.73-0.88x
cuBLAS, which runs 96x128 / 192x128 there). Triton's blocks are powers of two, so a tile of 192 is parts with
an accumulator each: three of 64 (`n3` side by side: one x block, three weight blocks a K step; `m3` stacked)
or 128 and 64 (`n2`, `m2`). Each output element still sums its K products in
BLOCK_K steps from 0, so the bits should be linear's (checked against the reference tile, then timed beside
linear's own pick and cuBLAS, graph-timed, weights cold).

    PYTHONPATH=src:kernels python tools/bench/wide_probe.py --out wide.json
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_kernels._triton import matmul as lin
from miles_kernels._triton.matmul import _grouped_order

# name: (split, BM, BN, warps, stages). n3: three BM x BN parts side by side; m3: stacked; n2: BM x BN and
# BM x BN/2 side by side (one wgmma of BN, one of BN/2 a K step); m2: BM x BN over BM/2 x BN.
CFGS = {
    "n3_128x64_w8_s4": ("n3", 128, 64, 8, 4), "n3_128x64_w8_s5": ("n3", 128, 64, 8, 5),
    "n3_64x64_w4_s6": ("n3", 64, 64, 4, 6), "m3_64x128_w4_s3": ("m3", 64, 128, 4, 3),
    "m3_64x128_w8_s4": ("m3", 64, 128, 8, 4),
    "n2_128x128_w8_s3": ("n2", 128, 128, 8, 3), "n2_128x128_w8_s4": ("n2", 128, 128, 8, 4),
    "n2_64x128_w4_s4": ("n2", 64, 128, 4, 4), "n2_64x128_w4_s6": ("n2", 64, 128, 4, 6),
    "m2_128x128_w8_s3": ("m2", 128, 128, 8, 3), "m2_128x128_w8_s4": ("m2", 128, 128, 8, 4),
}
# Compiled for sm_90a offline (triton 3.6's ptxas, tools/bench/sm90_regs.py wide_probe): no spills, 122-218
# registers, 139-221 KB of shared memory (the limit is 227 KB: n2 / m2 at 5 stages need 254 KB).
# 8B q|k|v (6,144 x 4,096), 0.6B gate|up (6,144 x 1,024), 8B o / down, 0.6B q|k|v at the step's batches
SHAPES = [(m, n, k) for m in (256, 384, 512) for (n, k) in ((6144, 4096), (6144, 1024), (4096, 4096),
                                                             (4096, 12288), (4096, 1024))]


@triton.jit
def _wide_kernel(x_desc, w_desc, y_desc, M, N, K, SPLIT_M: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # Persistent, grouped order as _linear_tma_kernel; a tile is three BLOCK_M x BLOCK_N parts, side by side
    # (SPLIT_M False: one x block, three weight blocks) or stacked (SPLIT_M: three x blocks, one weight block).
    if SPLIT_M:
        n_tiles_m = tl.cdiv(M, 3 * BLOCK_M)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
    else:
        n_tiles_m = tl.cdiv(M, BLOCK_M)
        n_tiles_n = tl.cdiv(N, 3 * BLOCK_N)
    # not flattened: flattened, ptxas serializes the parts' wgmmas (C7515), as in fused_linears' swiglu
    for tile in tl.range(tl.program_id(0), n_tiles_m * n_tiles_n, NUM_PROGRAMS):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        if SPLIT_M:
            m0, m1, m2 = tile_m * 3 * BLOCK_M, tile_m * 3 * BLOCK_M + BLOCK_M, tile_m * 3 * BLOCK_M + 2 * BLOCK_M
            n0, n1, n2 = tile_n * BLOCK_N, tile_n * BLOCK_N, tile_n * BLOCK_N
        else:
            m0, m1, m2 = tile_m * BLOCK_M, tile_m * BLOCK_M, tile_m * BLOCK_M
            n0, n1, n2 = tile_n * 3 * BLOCK_N, tile_n * 3 * BLOCK_N + BLOCK_N, tile_n * 3 * BLOCK_N + 2 * BLOCK_N
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if SPLIT_M:
                w = w_desc.load([n0, k0]).T
                acc0 = tl.dot(x_desc.load([m0, k0]), w, acc0)
                acc1 = tl.dot(x_desc.load([m1, k0]), w, acc1)
                acc2 = tl.dot(x_desc.load([m2, k0]), w, acc2)
            else:
                x = x_desc.load([m0, k0])
                acc0 = tl.dot(x, w_desc.load([n0, k0]).T, acc0)
                acc1 = tl.dot(x, w_desc.load([n1, k0]).T, acc1)
                acc2 = tl.dot(x, w_desc.load([n2, k0]).T, acc2)
        y_desc.store([m0, n0], acc0.to(y_desc.dtype))
        y_desc.store([m1, n1], acc1.to(y_desc.dtype))
        y_desc.store([m2, n2], acc2.to(y_desc.dtype))


@triton.jit
def _wide2_kernel(x_desc, xh_desc, w_desc, wh_desc, y_desc, yh_desc, M, N, K, ALONG_N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  NUM_PROGRAMS: tl.constexpr):
    # A tile is a BLOCK_M x BLOCK_N part and a half part beside it (ALONG_N: BLOCK_M x BLOCK_N / 2, the weight
    # by wh_desc) or below it (BLOCK_M / 2 x BLOCK_N, x by xh_desc); the *h descriptors have the half blocks.
    if ALONG_N:
        n_tiles_m = tl.cdiv(M, BLOCK_M)
        n_tiles_n = tl.cdiv(N, BLOCK_N + BLOCK_N // 2)
    else:
        n_tiles_m = tl.cdiv(M, BLOCK_M + BLOCK_M // 2)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
    # not flattened: flattened, ptxas serializes the parts' wgmmas (C7515), as in fused_linears' swiglu
    for tile in tl.range(tl.program_id(0), n_tiles_m * n_tiles_n, NUM_PROGRAMS):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        if ALONG_N:
            m0, n0 = tile_m * BLOCK_M, tile_n * (BLOCK_N + BLOCK_N // 2)
            m1, n1 = m0, n0 + BLOCK_N
            acc1 = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        else:
            m0, n0 = tile_m * (BLOCK_M + BLOCK_M // 2), tile_n * BLOCK_N
            m1, n1 = m0 + BLOCK_M, n0
            acc1 = tl.zeros((BLOCK_M // 2, BLOCK_N), dtype=tl.float32)
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([m0, k0])
            w = w_desc.load([n0, k0]).T
            acc0 = tl.dot(x, w, acc0)
            if ALONG_N:
                acc1 = tl.dot(x, wh_desc.load([n1, k0]).T, acc1)
            else:
                acc1 = tl.dot(xh_desc.load([m1, k0]), w, acc1)
        y_desc.store([m0, n0], acc0.to(y_desc.dtype))
        yh_desc.store([m1, n1], acc1.to(yh_desc.dtype))


def tile_shape(split: str, bm: int, bn: int) -> tuple[int, int]:
    """The rows x columns one program's tile covers."""
    return {"n3": (bm, 3 * bn), "m3": (3 * bm, bn), "n2": (bm, bn + bn // 2), "m2": (bm + bm // 2, bn)}[split]


def wide_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, y_MN: torch.Tensor, split: str, bm: int, bn: int,
                warps: int, stages: int, block_k: int = 64) -> None:
    """y = x @ w^T by multi-part tiles (split n3 / m3 / n2 / m2, CFGS), TMA, persistent."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    tm, tn = tile_shape(split, bm, bn)
    n_prog = min(lin._num_programs(x_MK.device), triton.cdiv(M, tm) * triton.cdiv(N, tn))
    desc = TensorDescriptor.from_tensor
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=8, NUM_PROGRAMS=n_prog, num_warps=warps,
                  num_stages=stages)
    if split in ("n3", "m3"):
        _wide_kernel[(n_prog,)](desc(x_MK, [bm, block_k]), desc(w_NK, [bn, block_k]), desc(y_MN, [bm, bn]),
                                M, N, K, SPLIT_M=split == "m3", **common)
        return
    along_n = split == "n2"
    hm, hn = (bm, bn // 2) if along_n else (bm // 2, bn)
    _wide2_kernel[(n_prog,)](desc(x_MK, [bm, block_k]), desc(x_MK, [hm, block_k]), desc(w_NK, [bn, block_k]),
                             desc(w_NK, [hn, block_k]), desc(y_MN, [bm, bn]), desc(y_MN, [hm, hn]), M, N, K,
                             ALONG_N=along_n, **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=list(CFGS), help="config names (default: all)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("wide_probe: needs a CUDA GPU (the kernels are checked on CPU in tests/kernels)")
    bad = sorted(set(a.only) - set(CFGS))
    if bad:
        raise SystemExit(f"wide_probe: --only {bad}: not configs; pick from {sorted(CFGS)}")
    sys.path.insert(0, os.path.dirname(__file__))
    from kernel_ops import timings
    from linear_sweep import REF, cold_weights

    sms = lin._num_programs(torch.device("cuda"))
    rows = []
    print(f"{'M':>5} {'N':>6} {'K':>6} {'config':<18} {'tiles':>5} {'waves':>5} {'same':>4} {'us':>8} {'x_cublas':>8}")
    for M, N, K in SHAPES:
        torch.manual_seed(M + N + K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        ref = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        lin._launch_linear(x, w, None, ref, REF)
        wn = cold_weights(w)
        _, base = timings(lambda: F.linear(x, wn()))
        pick = lin.linear_tile(M, torch.bfloat16, N, x.device)
        y = torch.empty_like(ref)
        runs = {f"pick_{pick.block_m}x{pick.block_n}_s{pick.num_stages}":
                (lambda wt: lin._launch_linear(x, wt, None, y, pick),
                 triton.cdiv(M, pick.block_m) * triton.cdiv(N, pick.block_n))}
        for name in a.only:
            split, bm, bn, warps, stages = CFGS[name]
            tm, tn = tile_shape(split, bm, bn)
            tiles = triton.cdiv(M, tm) * triton.cdiv(N, tn)
            runs[name] = ((lambda wt, c=CFGS[name]: wide_linear(x, wt, y, *c)), tiles)
        for name, (fn, tiles) in runs.items():
            y.zero_()
            try:
                fn(w)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
                print(f"{M:5} {N:6} {K:6} {name:<18} ERROR {str(e).splitlines()[0][:100]}", flush=True)
                rows.append(dict(M=M, N=N, K=K, cfg=name, err=str(e)[:300]))
                continue
            same = torch.equal(y, ref)
            _, us = timings(lambda: fn(wn()))  # noqa: B023
            us = (us or float("nan")) * 1e3
            ratio = base * 1e3 / us if base else float("nan")  # base None: cuBLAS's graph capture failed
            rows.append(dict(M=M, N=N, K=K, cfg=name, tiles=tiles, same=same, us=us,
                             cublas_us=base * 1e3 if base else None, x_cublas=ratio))
            print(f"{M:5} {N:6} {K:6} {name:<18} {tiles:5} {tiles / sms:5.2f} {int(same):4} {us:8.2f} {ratio:8.3f}",
                  flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
