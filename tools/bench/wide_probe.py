"""Three-part tiles for the small-M linears' wave tails: whether a 192-wide (or 192-tall) tile pays.

At M 256-512 on N 6,144 the small-M rule picks 128x128, whose grid makes 1.45 waves on 132 SMs (0.73-0.88x
cuBLAS, which runs 96x128 / 192x128 there). Triton's blocks are powers of two, so a tile of 192 is three
sub-tiles of 64 with three accumulators: `n3` walks BM x (3 x SN) (one x block, three weight blocks a K step),
`m3` walks (3 x SM) x BN (three x blocks, one weight block). Each output element still sums its K products in
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

# name: (split, BM, BN, warps, stages); split n3: BN is each of the three column parts, m3: BM each row part
CFGS = {
    "n3_128x64_w8_s3": ("n3", 128, 64, 8, 3), "n3_128x64_w8_s4": ("n3", 128, 64, 8, 4),
    "n3_128x64_w8_s5": ("n3", 128, 64, 8, 5), "n3_64x64_w4_s4": ("n3", 64, 64, 4, 4),
    "n3_64x64_w4_s6": ("n3", 64, 64, 4, 6), "n3_128x32_w4_s6": ("n3", 128, 32, 4, 6),
    "m3_64x128_w4_s3": ("m3", 64, 128, 4, 3), "m3_64x128_w8_s4": ("m3", 64, 128, 8, 4),
    "m3_64x64_w4_s5": ("m3", 64, 64, 4, 5),
}
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
    for tile in tl.range(tl.program_id(0), n_tiles_m * n_tiles_n, NUM_PROGRAMS, flatten=True):
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


def wide_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, y_MN: torch.Tensor, split: str, bm: int, bn: int,
                warps: int, stages: int, block_k: int = 64) -> None:
    """y = x @ w^T by three-part tiles (split n3 / m3; bm x bn each part), TMA, persistent."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    tiles = triton.cdiv(M, bm * (3 if split == "m3" else 1)) * triton.cdiv(N, bn * (3 if split == "n3" else 1))
    n_prog = min(lin._num_programs(x_MK.device), tiles)
    _wide_kernel[(n_prog,)](
        TensorDescriptor.from_tensor(x_MK, [bm, block_k]), TensorDescriptor.from_tensor(w_NK, [bn, block_k]),
        TensorDescriptor.from_tensor(y_MN, [bm, bn]), M, N, K, SPLIT_M=split == "m3", BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=block_k, GROUP_M=8, NUM_PROGRAMS=n_prog, num_warps=warps, num_stages=stages)


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
            tiles = triton.cdiv(M, bm * (3 if split == "m3" else 1)) * triton.cdiv(N, bn * (3 if split == "n3" else 1))
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
            ratio = base * 1e3 / us if base else float("nan")
            rows.append(dict(M=M, N=N, K=K, cfg=name, tiles=tiles, same=same, us=us, cublas_us=base * 1e3,
                             x_cublas=ratio))
            print(f"{M:5} {N:6} {K:6} {name:<18} {tiles:5} {tiles / sms:5.2f} {int(same):4} {us:8.2f} {ratio:8.3f}",
                  flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
