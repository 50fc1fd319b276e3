"""Do the small-M linears gain from asking L2 for their whole weight slice up front? At M 64 a
column tile's program walks K in BLOCK_K steps with `num_stages` loads in flight, a few KB of its
weight at a time; the 0.6B o / down at M 64 stream their 4-6 MB at ~1 TB/s (cuBLAS about the
same). This probe runs linear's pointer kernel as shipped (`ours`) and a copy that first issues
`prefetch.global.L2` for every line of its tile's weight rows (`prefetch`: a hint, the same loads
and dots after it, so the same bits), beside cuBLAS, graph-timed with the weights cycled past L2
as the decode step meets them, at the 0.6B and 8B decode shapes.

    PYTHONPATH=src:kernels python tools/bench/prefetch_probe.py --out prefetch.json
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from miles_kernels._triton import matmul as lin

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)
from linear_sweep import cold_weights  # noqa: E402

SHAPES = [(m, n, k) for m in (32, 64) for (n, k) in ((1024, 2048), (1024, 3072), (4096, 1024), (6144, 1024),
                                                    (4096, 4096), (4096, 12288))]


@triton.jit
def _prefetch_lines(ptrs):
    """Ask L2 for the line holding each address (a hint: loads nothing into registers)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     PRECISION: tl.constexpr, K_UNROLL: tl.constexpr, LINES: tl.constexpr):
    """linear's _linear_kernel (no bias) with the tile's weight rows asked of L2 first, LINES
    128-byte lines a row per prefetch step."""
    tile_m, tile_n = lin._grouped_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    base = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, LINES * 64):
        _prefetch_lines(base + tl.minimum(k0 + tl.arange(0, LINES) * 64, K - 1)[None, :])
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = lin._k_walk(x_ptrs, w_ptrs, rows < M, cols < N, K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, K_UNROLL)
    lin._bias_store(acc, y_ptr, y_ptr, rows, cols, M, N, stride_ym, False)


def launch_prefetch(x, w, y, t, lines: int) -> None:
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n),)
    _prefetch_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=t.block_m,
                           BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, PRECISION="tf32",
                           K_UNROLL=t.k_unroll, LINES=lines, num_warps=t.num_warps, num_stages=t.num_stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="prefetch_probe.json")
    ap.add_argument("--lines", nargs="+", type=int, default=[8, 32])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefetch_probe: needs a CUDA GPU (it times CUDA graph replays of GPU kernels)")
    rows = []
    for M, N, K in SHAPES:
        torch.manual_seed(M + N + K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        nxt = cold_weights(w)

        t = lin.linear_tile(M, x.dtype, N, x.device)
        if t.tma:
            continue
        ref = lin.linear(x, w)
        y = torch.empty_like(ref)
        row = dict(M=M, N=N, K=K, tile=list(t))
        row["cublas_us"] = 1e3 * timings(lambda: F.linear(x, nxt()))[1]  # noqa: B023
        row["ours_us"] = 1e3 * timings(lambda: lin._launch_linear(x, nxt(), None, y, t))[1]  # noqa: B023
        for lines in a.lines:
            launch_prefetch(x, w, y, t, lines)
            row[f"same_{lines}"] = bool(torch.equal(y, ref))
            row[f"prefetch_{lines}_us"] = 1e3 * timings(lambda: launch_prefetch(x, nxt(), y, t, lines))[1]  # noqa: B023
        rows.append(row)
        print(f"M={M:3} N={N:6} K={K:6} tile {t.block_m}x{t.block_n} s{t.num_stages} u{t.k_unroll}: cuBLAS "
              f"{row['cublas_us']:6.1f} ours {row['ours_us']:6.1f} "
              + " ".join(f"prefetch{n} {row[f'prefetch_{n}_us']:6.1f} (same {int(row[f'same_{n}'])})"
                         for n in a.lines) + " us", flush=True)
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
