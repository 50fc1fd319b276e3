"""Do warp-level `mma.sync m16n8k16` chains give our linears' bits, and how long is their K chain? At M 64 the
decode linears are bound by the length of the K walk (tma_linear_probe: the walk alone, operands in shared
memory, is 85% of the kernel: four dependent `wgmma m64nNk16` a K step of 64, ~70 cycles each). If the
Ampere-style instruction sums a k16 slice with the same bits as wgmma, a decode kernel of mma.sync chains
keeps `linear`'s numerics; its dependent latency sets the new floor.

Kernel: a warp a 16 x 8 output tile, K in steps of 16 in k order, fp32 from zero, one rounding to bf16
(`cvt.rn`); fragments loaded from global memory (slow: bits only). `chain`: fragments loaded once and the
K steps' mma.sync run on them (wrong values; the time of the dependent chain alone), beside the same chain
of wgmma from tma_linear_probe. Then a pipelined kernel of such chains (`PIPE`: cp.async stages, ldmatrix,
warps tiled over 16-row and 8-column tiles; 64-row tiles for M 64, 16-row ones for M <= 16): its bits at
every M, and its time beside Triton's at M 16 and 64 (graph-timed, weights cold).

    PYTHONPATH=src:kernels python tools/bench/mma_probe.py --out mma.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)
from linear_sweep import cold_weights  # noqa: E402
from tma_linear_probe import COMMON  # noqa: E402  (smem_u32, ldsm4 / ldsm2, mma16816, store2)

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
        mma16816(c, a, b);
    }
    const int col = n0 + 2 * t;
    store2(y, r0, col, M, N, c[0], c[1]);
    store2(y, r1, col, M, N, c[2], c[3]);
}
"""


PIPE = r"""
// 16 bytes global -> shared, zeros where !ok (src-size 0)
__device__ __forceinline__ void cp16(unsigned dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
// y[M, N] = x[M, K] @ w[N, K]^T, bf16, K % 64 == 0. A CTA: WM x WN warps, warp (i, j) rows 16 MT i .., cols
// 8 NT j ..; K in steps of 64 through a ring of S cp.async stages (rows padded to 72 elements: ldmatrix without
// bank conflicts); each step four k16 slices in order, an mma.sync a (m16, n8) tile a slice.
extern "C" __global__ void __launch_bounds__(WM * WN * 32) NAME(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, unsigned short* __restrict__ y,
    int M, int N, int K) {
    constexpr int BM = 16 * MT * WM, BN = 8 * NT * WN, P = 72, XS = BM * P, SS = (BM + BN) * P, T = WM * WN * 32;
    extern __shared__ __align__(16) unsigned short sm[];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wi = warp / WN, wj = warp % WN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, nk = K / 64;
    const unsigned base = smem_u32(sm);
    float c[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) c[i][j][0] = c[i][j][1] = c[i][j][2] = c[i][j][3] = 0.f;
    auto load = [&](int ks) {
        const int st = (ks % S) * SS, k0 = ks * 64;
        for (int q = tid; q < (BM + BN) * 8; q += T) {
            const int r = q / 8, ch = q % 8;
            if (r < BM) cp16(base + 2 * (st + r * P + ch * 8), x + (long long)min(m0 + r, M - 1) * K + k0 + ch * 8,
                             m0 + r < M);
            else cp16(base + 2 * (st + r * P + ch * 8), w + (long long)min(n0 + r - BM, N - 1) * K + k0 + ch * 8,
                      n0 + r - BM < N);
        }
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < nk) load(s);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int ks = 0; ks < nk; ++ks) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(S - 2) : "memory");
        __syncthreads();
        if (ks + S - 1 < nk) load(ks + S - 1);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        const unsigned st = base + 2 * (ks % S) * SS;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const unsigned addr = st + 2 * ((16 * (MT * wi + i) + lane % 16) * P + kk * 16 + (lane / 16) * 8);
                ldsm4(a[i], addr);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const unsigned addr = st + 2 * XS + 2 * ((8 * (NT * wj + j) + lane % 8) * P + kk * 16
                                                        + ((lane / 8) % 2) * 8);
                ldsm2(b[j], addr);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j)
                    mma16816(c[i][j], a[i], b[j]);
        }
    }
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + 16 * (MT * wi + i) + g + 8 * h, col = n0 + 8 * (NT * wj + j) + 2 * t;
                store2(y, row, col, M, N, c[i][j][2 * h], c[i][j][2 * h + 1]);
            }
}
"""


def pipe_source(wm: int, mt: int, wn: int, nt: int, s: int) -> tuple[str, str]:
    name = f"mma_pipe_wm{wm}_mt{mt}_wn{wn}_nt{nt}_s{s}"
    head = f"#define WM {wm}\n#define MT {mt}\n#define WN {wn}\n#define NT {nt}\n#define S {s}\n"
    return COMMON + head + PIPE.replace("NAME", name), name


def pipe_smem(wm: int, mt: int, wn: int, nt: int, s: int) -> int:
    return s * (16 * mt * wm + 8 * nt * wn) * 72 * 2


# (WM, MT, WN, NT, S): 64-row tiles (M 64) and 16-row ones (M <= 16)
PIPE_CFGS = [(1, 4, 4, 1, 4), (1, 4, 4, 2, 4), (2, 2, 4, 1, 4), (4, 1, 4, 1, 4), (2, 2, 2, 2, 4), (1, 4, 8, 1, 4),
             (1, 4, 4, 1, 6), (1, 1, 4, 1, 4), (1, 1, 8, 1, 4), (1, 1, 4, 2, 6)]

SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 4096), (4096, 4096), (4096, 12288)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mma_probe.json")
    ap.add_argument("--ms", type=int, nargs="+", default=[64, 16, 1, 37, 256])
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("mma_probe: needs a CUDA GPU of compute capability 9.0 (Hopper)")
    import miles_kernels as mk
    from tma_linear_probe import TMALinear

    kern = torch.cuda._compile_kernel(COMMON + SOURCE, "mma_linear", compute_capability="90a")
    pipes = {}
    for cfg in PIPE_CFGS:
        src, name = pipe_source(*cfg)
        pipes[cfg] = torch.cuda._compile_kernel(src, name, compute_capability="90a")
        pipes[cfg].set_shared_memory_config(pipe_smem(*cfg))
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
            nxt = cold_weights(w) if M in (16, 64) else None
            if nxt is not None:
                row["triton_cold_us"] = 1e3 * timings(lambda: mk.linear(x, nxt()))[1]  # noqa: B023
            pipe_res, bad = {}, []
            for cfg, pk in pipes.items():
                wm, mt, wn, nt, _ = cfg
                bm, bn = 16 * mt * wm, 8 * nt * wn

                def launch(y, w, pk=pk, cfg=cfg, bm=bm, bn=bn, x=x, M=M, N=N, K=K):
                    pk(grid=(-(-N // bn), -(-M // bm), 1), block=(32 * cfg[0] * cfg[2], 1, 1), args=[x, w, y, M, N, K],
                       shared_mem=pipe_smem(*cfg))

                y = torch.full_like(want, float("nan"))
                launch(y, w)
                torch.cuda.synchronize()
                r = dict(same=bool(torch.equal(y.view(torch.int16), want.view(torch.int16))))
                if not r["same"]:
                    bad.append(cfg)
                elif nxt is not None and (bm == 16) == (M == 16):
                    r["us"] = 1e3 * timings(lambda launch=launch, y=y: launch(y, nxt()))[1]  # noqa: B023
                pipe_res["wm{}_mt{}_wn{}_nt{}_s{}".format(*cfg)] = r
            row["pipe"] = pipe_res
            msg += f"; pipelined mma.sync: {len(pipes) - len(bad)}/{len(pipes)} configs same bits"
            timed = sorted((v["us"], k) for k, v in pipe_res.items() if "us" in v)
            if timed:
                msg += f", best {timed[0][1]} {timed[0][0]:.1f} us vs Triton {row['triton_cold_us']:.1f} (weights cold)"
            print(msg, flush=True)
            rows.append(row)
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
