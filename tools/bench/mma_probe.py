"""Do warp-level `mma.sync m16n8k16` chains give our linears' bits, and how long is their K chain? At M 64 the
decode linears are bound by the length of the K walk (tma_linear_probe: the walk alone, operands in shared
memory, is 85% of the kernel: four dependent `wgmma m64nNk16` a K step of 64, ~70 cycles each). If the
Ampere-style instruction sums a k16 slice with the same bits as wgmma, a decode kernel of mma.sync chains
keeps `linear`'s numerics; its dependent latency sets the new floor.

Kernel: a warp a 16 x 8 output tile, K in steps of 16 in k order, fp32 from zero, one rounding to bf16
(`cvt.rn`); fragments loaded from global memory (slow: bits only). `chain`: fragments loaded once and the
K steps' mma.sync run on them (wrong values; the time of the dependent chain alone), beside the same chain
of wgmma from tma_linear_probe.

    PYTHONPATH=src:kernels python tools/bench/mma_probe.py --out mma.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

SOURCE = r"""
// y[M, N] = x[M, K] @ w[N, K]^T, bf16 (K % 16 == 0); block of 4 warps, warp j: rows 16 blockIdx.y .., cols
// 8 (4 blockIdx.x + j) ..
extern "C" __global__ void __launch_bounds__(128) mma_linear(
    const unsigned* __restrict__ x, const unsigned* __restrict__ w, unsigned short* __restrict__ y,
    int M, int N, int K, int chain) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int r0 = blockIdx.y * 16 + g, r1 = r0 + 8, n0 = (blockIdx.x * 4 + warp) * 8, n = n0 + g;
    const int k2 = K / 2;  // bf16 pairs a row
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    for (int k0 = 0; k0 < K; k0 += 16) {
        if (!chain || k0 == 0) {
            const int p = k0 / 2 + t;
            a[0] = r0 < M ? x[(long long)r0 * k2 + p] : 0u;
            a[1] = r1 < M ? x[(long long)r1 * k2 + p] : 0u;
            a[2] = r0 < M ? x[(long long)r0 * k2 + p + 4] : 0u;
            a[3] = r1 < M ? x[(long long)r1 * k2 + p + 4] : 0u;
            b[0] = n < N ? w[(long long)n * k2 + p] : 0u;
            b[1] = n < N ? w[(long long)n * k2 + p + 4] : 0u;
        }
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    const int col = n0 + 2 * t;
    for (int h = 0; h < 2; ++h) {
        const int row = h ? r1 : r0;
        if (row < M && col < N) {
            unsigned short lo, hi;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(lo) : "f"(c[2 * h]));
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hi) : "f"(c[2 * h + 1]));
            y[(long long)row * N + col] = lo;
            if (col + 1 < N) y[(long long)row * N + col + 1] = hi;
        }
    }
}
"""

SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 4096), (4096, 4096), (4096, 12288)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mma_probe.json")
    ap.add_argument("--ms", type=int, nargs="+", default=[64, 1, 37, 256])
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("mma_probe: needs a CUDA GPU of compute capability 9.0 (Hopper)")
    import miles_kernels as mk
    from tma_linear_probe import TMALinear

    kern = torch.cuda._compile_kernel(SOURCE, "mma_linear", compute_capability="90a")
    rows = []
    for M in a.ms:
        for N, K in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(M + N + K)
            x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
            w = (torch.randn(N, K, generator=g, device="cuda") * K**-0.5).to(torch.bfloat16)
            want = mk.linear(x, w)
            y = torch.full_like(want, float("nan"))

            def run(y, chain, x=x, w=w, M=M, N=N, K=K):
                kern(grid=(-(-N // 32), -(-M // 16), 1), block=(128, 1, 1), args=[x, w, y, M, N, K, chain])

            run(y, 0)
            torch.cuda.synchronize()
            differ = int((y.view(torch.int16) != want.view(torch.int16)).sum())
            row = dict(M=M, N=N, K=K, same=differ == 0, differ=differ,
                       err=(y.float() - want.float()).abs().max().item())
            msg = f"M={M:4} N={N:5} K={K:5}: mma.sync bits {'same' if differ == 0 else f'differ at {differ}'}"
            if M == 64:
                scratch = torch.empty_like(want)
                row["mma_chain_us"] = 1e3 * timings(lambda: run(scratch, 1))[1]  # noqa: B023
                wg = TMALinear(1, 16, 1, 8, chain=True)
                row["wgmma_chain_us"] = 1e3 * timings(lambda: wg(x, w, scratch))[1]  # noqa: B023
                row["triton_us"] = 1e3 * timings(lambda: mk.linear(x, w))[1]  # noqa: B023
                msg += (f"; chain alone: mma.sync {row['mma_chain_us']:.1f} us, wgmma n16 {row['wgmma_chain_us']:.1f}"
                        f" (Triton's whole linear {row['triton_us']:.1f}, weights warm)")
            print(msg, flush=True)
            rows.append(row)
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
