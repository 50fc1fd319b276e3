"""A CUDA C++ linear with TMA loads and cluster multicast of x, checked bit for bit against miles_kernels'
linear and timed beside it (Triton) and cuBLAS. Why: at M 64 (the decode step) every CTA of the Triton tile
reads all of x through L2 (0.6B down: 64 CTAs x 384 KB = 24 MB of L2 reads for 6 MB of weights), and Triton
3.6 has no multicast. Here a cluster of C CTAs along N reads each x tile once from L2 and multicasts it into
all C CTAs' shared memory. Each CTA keeps the Triton tiles' K walk (K in steps of 64, four wgmma
m64nBNk16 a step, in k order, fp32 accumulate from zero, one rounding to bf16), so the bits must equal
`linear`'s (wgmma_probe.py showed a hand-written wgmma tile does).

Kernel: WG consumer warpgroups (a 64-row slice each, BM = 64 WG) and one producer warp that issues the TMA
loads into a ring of S stages (full / empty mbarriers; a stage is refilled once every CTA of the cluster
has released it, since the multicast writes into all of them). Shared memory tiles in the 128-byte swizzle
that TMA writes and wgmma reads. Compiled on the GPU by NVRTC (torch.cuda._compile_kernel); the tensor maps
are encoded by the driver (cuTensorMapEncodeTiled) and passed by value.

At M <= 64 the probe also builds mma.sync consumers (`_m` configs; m16n8k16 sums a k16 slice with wgmma's bits,
mma_probe.py): four warps along N (16 MT-row tiles) or along M (`_w4`: a 64-row tile), fragments loaded by
ldmatrix a K step ahead of the chains. A PDL build (`pdl`, for linear_chain_probe.py) loads the first S steps'
weights before waiting for the kernel ahead of it in the stream.

    PYTHONPATH=src:kernels python tools/bench/tma_linear_probe.py --out tma.json [--quick]
"""

import argparse
import ctypes
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)
from linear_sweep import cold_weights  # noqa: E402

COMMON = r"""
struct __align__(64) TMap { unsigned long long v[16]; };

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{ .reg .pred p;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// Arrive on bar's twin in cluster CTA `cta` where `pred` (a predicate, not a branch: no divergence near wgmma).
// Default .release.cta as CUTLASS's ClusterBarrier::arrive: .release.cluster puts a MEMBAR.ALL.GPU in every K step.
__device__ __forceinline__ void mbar_arrive_cta(unsigned bar, unsigned cta, int pred) {
    asm volatile("{ .reg .b32 r; .reg .pred p;\nsetp.ne.b32 p, %2, 0;\nmapa.shared::cluster.u32 r, %0, %1;\n"
                 "@p mbarrier.arrive.shared::cluster.b64 _, [r];\n}\n"
                 :: "r"(bar), "r"(cta), "r"(pred) : "memory");
}
// PDL: let the next kernel in the stream launch now / wait for the previous one to finish (its writes seen).
__device__ __forceinline__ void pdl_launch_next() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void tma_load(unsigned dst, const TMap* map, unsigned bar, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4}], [%2];\n"
                 :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1) : "memory");
}
__device__ __forceinline__ void tma_load_mc(unsigned dst, const TMap* map, unsigned bar, int c0, int c1,
                                            unsigned short mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%3, %4}], [%2], %5;\n"
                 :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1), "h"(mask) : "memory");
}
// wgmma smem descriptor: K-major tile in the 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long desc128(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
        | (1ull << 62);
}
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_round(float f) { return __uint_as_float((unsigned)to_bf16(f) << 16); }
// silu(g) * u as Triton 3.6 lowers silu_times (g / (1 + exp(-g)) * u) on sm_90: the same instructions in the
// same order, so the same bits (no pair of them can contract into an FMA).
__device__ __forceinline__ float silu_times(float g, float u) {
    float y;
    asm("{ .reg .f32 t;\nsub.f32 t, 0f00000000, %1;\nmul.f32 t, t, 0f3FB8AA3B;\nex2.approx.f32 t, t;\n"
        "add.f32 t, t, 0f3F800000;\ndiv.full.f32 t, %1, t;\nmul.f32 %0, t, %2;\n}" : "=f"(y) : "f"(g), "f"(u));
    return y;
}
__device__ __forceinline__ void store2(unsigned short* y, int row, int col, int M, int N, float v0, float v1) {
    if (row < M && col < N) {
        const unsigned v = (unsigned)to_bf16(v0) | ((unsigned)to_bf16(v1) << 16);
        if (col + 1 < N) *reinterpret_cast<unsigned*>(y + (unsigned long long)row * N + col) = v;
        else y[(unsigned long long)row * N + col] = (unsigned short)v;
    }
}
__device__ __forceinline__ void ldsm4(unsigned* a, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm2(unsigned* b, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr)
                 : "memory");
}
// c += a b over one k16 slice (the m16n8k16 bf16 mma; the same bits as wgmma's k16: mma_probe.py)
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

KERNEL = r"""
// Linears (SWIGLU 0): y_i[M, N_i] = x[M, K] @ w_i[N_i, K]^T for up to three weights, column tiles [0, T1) w0's,
// [T1, T2) w1's, the rest w2's. SWIGLU 1: y0[M, N0] = silu(x @ w0^T) * (x @ w1^T), each product rounded to bf16
// first (the Triton swiglu's bits). bf16; a BM x BN tile a CTA; clusters of C CTAs along N share x by multicast.
extern "C" __global__ void __launch_bounds__(WG * 128 + 32) __cluster_dims__(C, 1, 1) NAME(
    const __grid_constant__ TMap xmap, const __grid_constant__ TMap wmap0, const __grid_constant__ TMap wmap1,
    const __grid_constant__ TMap wmap2, unsigned short* __restrict__ y0, unsigned short* __restrict__ y1,
    unsigned short* __restrict__ y2, int M, int K, int N0, int N1, int N2, int T1, int T2) {
    constexpr int BM = MT ? 16 * MT * WM : 64 * WG, XB = BM * 128, WB = BN * 128, SB = XB + (1 + SWIGLU) * WB;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned base = (smem_u32(smem_raw) + 1023) & ~1023u;  // the swizzle wants 1024-byte aligned tiles
    const unsigned full0 = base + S * SB, empty0 = full0 + 8 * S;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int bx = blockIdx.x, seg = SWIGLU ? 0 : (bx >= T2 ? 2 : bx >= T1 ? 1 : 0);
    const int n0 = (bx - (seg == 2 ? T2 : seg == 1 ? T1 : 0)) * BN, m0 = blockIdx.y * BM;
    const int N = seg == 2 ? N2 : seg == 1 ? N1 : N0;
    const TMap* wmap = seg == 2 ? &wmap2 : seg == 1 ? &wmap1 : &wmap0;
    unsigned short* y = seg == 2 ? y2 : seg == 1 ? y1 : y0;
    unsigned rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int nk = (K + 63) / 64;
    if (tid == 0) {
        for (int s = 0; s < S; ++s) { mbar_init(full0 + 8 * s, 1); mbar_init(empty0 + 8 * s, C * WG * (MT ? 4 : 1)); }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (C > 1) cluster_sync(); else __syncthreads();
    if (PDL == 1) pdl_launch_next();
    if (warp == WG * 4) {  // producer
        if (lane == 0) {
            auto load_w = [&](int ks) {  // step ks's stage: expect its bytes, load the weight tile(s)
                const unsigned full = full0 + 8 * (ks % S), st = base + (ks % S) * SB;
                mbar_expect_tx(full, SB);
                tma_load(st + XB, wmap, full, ks * 64, n0);
                if (SWIGLU) tma_load(st + XB + WB, &wmap1, full, ks * 64, n0);
            };
            auto load_x = [&](int ks) {  // this CTA's slice of step ks's x, multicast to the cluster
                const unsigned full = full0 + 8 * (ks % S), st = base + (ks % S) * SB;
                if (C > 1)
                    tma_load_mc(st + rank * (XB / C), &xmap, full, ks * 64, m0 + rank * (BM / C), (1 << C) - 1);
                else
                    tma_load(st, &xmap, full, ks * 64, m0);
            };
            int ks0 = 0;
            if (PDL) {  // the weights of the first S steps load while the previous kernel runs; x after it is done
                ks0 = nk < S ? nk : S;
                for (int ks = 0; ks < ks0; ++ks) load_w(ks);
                pdl_wait();
                for (int ks = 0; ks < ks0; ++ks) load_x(ks);
            }
            for (int ks = ks0; ks < (CHAIN ? (nk < S ? nk : S) : nk); ++ks) {
                if (ks >= S) mbar_wait(empty0 + 8 * (ks % S), ((ks / S) - 1) & 1);
                load_w(ks);
                load_x(ks);
            }
            if (PDL == 3) pdl_launch_next();  // the last loads are issued: the next kernel may launch
        }
#if MT
    } else {  // mma.sync consumers: 4 WG warps as WM along M x WN along N, each MT x NT (m16, n8) tiles
        if (PDL) pdl_wait();  // y may still be read by the previous kernel
        constexpr int WN = 4 * WG / WM, NT = BN / (8 * WN);
        const int wm = warp / WN, wn = warp % WN;
        float c[MT][NT][4];
#if SWIGLU
        float e[MT][NT][4];
#endif
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int q = 0; q < 4; ++q) { c[i][t][q] = 0.f; E_ZERO_MMA }
        // A K step's fragments (x: MT m16 tiles, w: NT n8 tiles, SWIGLU: the up weight's too) for its four k16
        // slices; step ks + 1's are loaded before step ks's mma chains run, so no mma waits on an ldmatrix. A
        // stage is released a chain after its ldmatrix (an ldmatrix may still be reading when it issues), behind
        // a proxy fence: the refill is a TMA (async proxy) write after these generic-proxy reads.
        struct Frag { unsigned a[4][MT][4], b[4][NT][2], u[4][NT][SWIGLU ? 2 : 1]; };
        auto fetch = [&](Frag& f, int ks) {
            const int s = ks % S;
            const unsigned st = base + s * SB;
            if (!CHAIN || ks < S) mbar_wait(full0 + 8 * s, (ks / S) & 1);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {  // 16-byte chunk ch of row r sits at r 128 + (ch ^ r % 8) 16
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int r = 16 * (MT * wm + i) + lane % 16, ch = 2 * kk + lane / 16;
                    ldsm4(f.a[kk][i], st + r * 128 + ((ch ^ (r & 7)) << 4));
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int r = 8 * (NT * wn + t) + lane % 8, ch = 2 * kk + (lane / 8) % 2;
                    ldsm2(f.b[kk][t], st + XB + r * 128 + ((ch ^ (r & 7)) << 4));
                    if (SWIGLU) ldsm2(f.u[kk][t], st + XB + WB + r * 128 + ((ch ^ (r & 7)) << 4));
                }
            }
        };
        auto release = [&](int ks) {  // this warp's reads of step ks's stage are done: lane c tells CTA c
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncwarp();
            mbar_arrive_cta(empty0 + 8 * (ks % S), lane, lane < C);
        };
        auto chains = [&](const Frag& f) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {  // k16 slices in order
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        mma16816(c[i][t], f.a[kk][i], f.b[kk][t]);
#if SWIGLU
                        mma16816(e[i][t], f.a[kk][i], f.u[kk][t]);
#endif
                    }
            }
        };
        Frag f0, f1;
        fetch(f0, 0);
        int ks = 0;
        for (; ks + 2 < nk; ks += 2) {
            release(ks);  // f0's ldmatrix issued a chain ago
            fetch(f1, ks + 1);
            chains(f0);
            release(ks + 1);
            fetch(f0, ks + 2);
            chains(f1);
        }
        release(ks);
        if (ks + 1 < nk) {
            fetch(f1, ks + 1);
            chains(f0);
            release(ks + 1);
            chains(f1);
        } else {
            chains(f0);
        }
        if (PDL == 3) pdl_launch_next();
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // the m16n8 f32 fragment: (row, col) and (row, col + 1)
                    const int row = m0 + 16 * (MT * wm + i) + lane / 4 + 8 * h;
                    const int col = n0 + 8 * (NT * wn + t) + 2 * (lane % 4);
#if SWIGLU
                    const float v0 = silu_times(bf16_round(c[i][t][2 * h]), bf16_round(e[i][t][2 * h]));
                    const float v1 = silu_times(bf16_round(c[i][t][2 * h + 1]), bf16_round(e[i][t][2 * h + 1]));
#else
                    const float v0 = c[i][t][2 * h], v1 = c[i][t][2 * h + 1];
#endif
                    store2(y, row, col, M, N, v0, v1);
                }
    }
#else
    } else {
        if (PDL) pdl_wait();  // y may still be read by the previous kernel
        const int g = warp / 4;
        float d[BN / 2];
#if SWIGLU
        float e[BN / 2];
#endif
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) { d[i] = 0.f; E_ZERO }
        for (int ks = 0; ks < nk; ++ks) {
            const int s = ks % S;
            const unsigned st = base + s * SB;
            if (!CHAIN || ks < S) mbar_wait(full0 + 8 * s, (ks / S) & 1);
            FENCE_D
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const unsigned long long da = desc128(st + g * 8192 + kk * 32), db = desc128(st + XB + kk * 32);
                WGMMA
            }
#if SWIGLU
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const unsigned long long da = desc128(st + g * 8192 + kk * 32), db = desc128(st + XB + WB + kk * 32);
                WGMMA_E
            }
#endif
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            FENCE_D
            // step ks - 1's wgmmas are done: its stage is free, cluster-wide (thread c tells CTA c)
            mbar_arrive_cta(empty0 + 8 * ((ks + S - 1) % S), tid % 128, ks > 0 && tid % 128 < C);
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        FENCE_D
        if (PDL == 3) pdl_launch_next();
        const int wl = warp % 4;
#pragma unroll
        for (int i = 0; i < BN / 2; i += 2) {  // the m64nNk16 f32 fragment: (row, col) and (row, col + 1)
            const int row = m0 + g * 64 + 16 * wl + lane / 4 + 8 * ((i / 2) % 2);
            const int col = n0 + (lane % 4) * 2 + 8 * (i / 4);
#if SWIGLU
            const float v0 = silu_times(bf16_round(d[i]), bf16_round(e[i]));
            const float v1 = silu_times(bf16_round(d[i + 1]), bf16_round(e[i + 1]));
#else
            const float v0 = d[i], v1 = d[i + 1];
#endif
            store2(y, row, col, M, N, v0, v1);
        }
    }
#endif
    if (C > 1) cluster_sync();  // no CTA leaves while a peer may still multicast into it or arrive on its barriers
}
"""


def wgmma_asm(bn: int, acc: str = "d") -> str:
    """The inline asm of one wgmma m64n{bn}k16 (bf16 in, f32 accumulate into acc[0 .. bn / 2))."""
    n = bn // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"({acc}[{i}])' for i in range(n))
    return (f'asm volatile("wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.bf16.bf16 {{{regs}}}, %{n}, %{n + 1}, '
            f'1, 1, 1, 0, 0;\\n" : {outs} : "l"(da), "l"(db));')


def source(wg: int, bn: int, c: int, s: int, chain: bool = False, swiglu: bool = False, mt: int = 0,
           wm: int = 1, pdl: int = 0) -> tuple[str, str]:
    """The kernel of one config; chain: the first S stages loaded once and walked round and round (wrong
    values; the time of the K chain itself, loads taken away); swiglu: gate and up products, silu_times;
    mt > 0: mma.sync consumers, the 4 wg warps as wm along M (16 mt rows each) by 4 wg / wm along N, else
    wgmma ones over 64 wg rows; pdl (for a launch with programmatic stream serialization): the first S steps'
    weights load before the wait for the previous kernel, and the next kernel may launch 1: at once, 2: at exit,
    3: once this CTA's last loads are issued (its producer) or its K walk is done (its consumers)."""
    kind = ("swiglu" if swiglu else "linear") + ("_mma" if mt else "")
    name = f"tma_{kind}_{config_name((wg, bn, c, s, mt, wm))}" + ("_chain" if chain else "") + (
        f"_pdl{pdl}" if pdl else "")
    accs = ("d", "e") if swiglu else ("d",)
    fence = " ".join(f'asm volatile("" : "+f"({a}[{i}]) :: "memory");' for a in accs for i in range(bn // 2))
    body = (KERNEL.replace("WGMMA_E", wgmma_asm(bn, "e")).replace("WGMMA", wgmma_asm(bn)).replace("NAME", name)
            .replace("FENCE_D", fence).replace("E_ZERO_MMA", "e[i][t][q] = 0.f;" if swiglu else "")
            .replace("E_ZERO", "e[i] = 0.f;" if swiglu else ""))
    head = (f"#define WG {wg}\n#define BN {bn}\n#define C {c}\n#define S {s}\n#define CHAIN {int(chain)}\n"
            f"#define SWIGLU {int(swiglu)}\n#define MT {mt}\n#define WM {wm}\n#define PDL {pdl}\n")
    return COMMON + head + body, name


def smem_bytes(wg: int, bn: int, s: int, swiglu: bool = False, mt: int = 0, wm: int = 1) -> int:
    return s * ((16 * mt * wm if mt else 64 * wg) * 128 + (1 + swiglu) * bn * 128) + 16 * s + 1024


class TMALinear:
    """One compiled config. linears: call(x, ws, ys) runs ys[i] = x @ ws[i]^T for 1-3 weights (a tensor for
    one); swiglu: call(x, (w_gate, w_up), y) runs y = silu(x @ w_gate^T) * (x @ w_up^T). bf16, K-contiguous."""

    def __init__(self, wg: int, bn: int, c: int, s: int, chain: bool = False, swiglu: bool = False, mt: int = 0,
                 wm: int = 1, pdl: int = 0):
        from torch.cuda._utils import _get_gpu_runtime_library

        self.wg, self.bn, self.c, self.s, self.swiglu = wg, bn, c, s, swiglu
        self.bm = 16 * mt * wm if mt else 64 * wg
        self.pdl = pdl
        src, name = source(wg, bn, c, s, chain, swiglu, mt, wm, pdl)
        self.kernel = torch.cuda._compile_kernel(src, name, compute_capability="90a")
        self.smem = smem_bytes(wg, bn, s, swiglu, mt, wm)
        self.kernel.set_shared_memory_config(self.smem)
        self.cuda = _get_gpu_runtime_library()
        self.maps: dict[tuple, ctypes.Array] = {}

    def tmap(self, t: torch.Tensor, box_rows: int) -> ctypes.Array:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), box_rows)
        m = self.maps.get(key)
        if m is None:
            buf = (ctypes.c_uint8 * 192)()  # the map wants 64-byte alignment
            m = (ctypes.c_uint64 * 16).from_buffer(buf, -ctypes.addressof(buf) % 64)
            rows, cols = t.shape
            dims = (ctypes.c_uint64 * 2)(cols, rows)
            strides = (ctypes.c_uint64 * 1)(t.stride(0) * t.element_size())
            box = (ctypes.c_uint32 * 2)(64, box_rows)
            ones = (ctypes.c_uint32 * 2)(1, 1)
            # bf16 = 9, no interleave, 128-byte swizzle = 3, L2 promotion 256 B = 3, out-of-bounds zeros = 0
            rc = self.cuda.cuTensorMapEncodeTiled(m, 9, 2, ctypes.c_void_p(t.data_ptr()), dims, strides, box, ones,
                                                  0, 3, 3, 0)
            if rc != 0:
                raise RuntimeError(f"cuTensorMapEncodeTiled failed ({rc}) for shape {tuple(t.shape)}")
            self.maps[key] = m
        return m

    def __call__(self, x: torch.Tensor, ws, ys) -> None:
        ws = (ws,) if isinstance(ws, torch.Tensor) else tuple(ws)
        ys = (ys,) if isinstance(ys, torch.Tensor) else tuple(ys)
        M, K = x.shape
        if self.swiglu:  # segment 0 only: gate in map 0, up in map 1
            ws, ys, tiles = (ws[0], ws[1], ws[0]), ys * 3, [-(-ws[0].shape[0] // self.bn), 0, 0]
        else:  # right-aligned in the three segments, so the cluster's padding CTAs fall past the last weight's N
            pad = 3 - len(ws)
            tiles = [0] * pad + [-(-w.shape[0] // self.bn) for w in ws]
            ws, ys = (ws[0],) * pad + ws, (ys[0],) * pad + ys
        t1, t2 = tiles[0], tiles[0] + tiles[1]
        vals = (self.tmap(x, self.bm // self.c), *[self.tmap(w, self.bn) for w in ws],
                *[ctypes.c_void_p(y.data_ptr()) for y in ys],
                *[ctypes.c_int(v) for v in (M, K, *[w.shape[0] for w in ws], t1, t2)])
        args = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in vals])
        gx = -(-sum(tiles) // self.c) * self.c
        dims = (gx, -(-M // self.bm), 1, self.wg * 128 + 32, 1, 1, self.smem)
        stream = torch.cuda.current_stream()._as_parameter_
        if self.pdl:
            attr = LaunchAttribute(id=6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value[0] = 1
            cfg = LaunchConfig(*dims, stream, ctypes.pointer(attr), 1)
            rc = self.cuda.cuLaunchKernelEx(ctypes.byref(cfg), self.kernel.func, args, None)
        else:
            rc = self.cuda.cuLaunchKernel(self.kernel.func, *dims, stream, args, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernel failed ({rc})")


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [*[(f, ctypes.c_uint) for f in ("gx", "gy", "gz", "bx", "by", "bz", "smem")],
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


SHAPES_06 = [(1024 * 4, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down (N, K)
SHAPES_8 = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
# The decode step's fused linears (--fused): q|k|v as three weights (linears), gate|up with the SiLU (swiglu).
FUSED = [("linears", (2048, 1024, 1024), 1024), ("swiglu", (3072, 3072), 1024),
         ("linears", (4096, 1024, 1024), 4096), ("swiglu", (12288, 12288), 4096)]


def configs(m: int, quick: bool, swiglu: bool = False):
    """(wg, bn, c, s, mt, wm): the wgmma kernels (mt 0) and, at m <= 64, the mma.sync ones: 4 warps along N
    (wm 1: 16 mt-row tiles, one n8 column tile a warp, two at bn 64), or at m > 16 4 warps along M (wm 4: a
    64-row tile, a warp's m16 rows by the tile's bn columns, the weight tile read from L2 once; clusters to 8
    so x is read from L2 once per 8 column tiles)."""
    if m <= 64:
        grid = itertools.product([1], [16, 32, 64], [1, 2, 4], [8] if quick else [4, 8, 12], [0], [1])
        mts = [1] if m <= 16 else [1, 2] if m <= 32 else [1, 2, 4]
        mma = [(1, 32, c, 8, mt, 1) for mt in mts for c in (1, 2, 4)] + [(1, 64, c, 8, mt, 1) for mt in mts[:2]
                                                                       for c in (1, 2)]
        if m > 16:
            mma += itertools.product([1], [8, 16, 32], [1, 2, 4, 8], [8] if quick else [8, 12], [1], [4])
        grid = [*grid, *(cfg for cfg in mma if 16 * cfg[4] * cfg[5] // cfg[2] >= 8
                         and not (swiglu and cfg[1] == 64))]
    else:
        grid = itertools.product([1, 2], [64, 128] if quick else [32, 64, 128], [1, 2, 4], [4] if quick else [4, 6],
                                 [0], [1])
    return [cfg for cfg in grid if smem_bytes(cfg[0], cfg[1], cfg[3], swiglu, *cfg[4:]) <= 227 << 10]


def config_name(cfg) -> str:
    """wg1_n16_c4_s8 (wgmma), wg1_n32_c2_s8_m4 (mma.sync, warps along N), wg1_n8_c8_s8_m1_w4 (warps along M)."""
    wm = cfg[5] if len(cfg) > 5 else 1
    return "wg{}_n{}_c{}_s{}".format(*cfg[:4]) + (f"_m{cfg[4]}" if cfg[4] else "") + (f"_w{wm}" if wm > 1 else "")


def parse_config(name: str) -> tuple[int, ...]:
    """config_name's inverse: (wg, bn, c, s, mt, wm)."""
    parts = dict((p[:2], int(p[2:])) if p.startswith("wg") else (p[0], int(p[1:])) for p in name.split("_"))
    return parts["wg"], parts["n"], parts["c"], parts["s"], parts.get("m", 0), parts.get("w", 1)


def probe_row(mk, kernels: dict, M: int, op: str, ns: tuple, K: int, quick: bool) -> dict:
    """Bits of every config against miles_kernels (linear / linears / swiglu) at one shape; graph times of
    the same-bits ones beside Triton and (linear only) cuBLAS at M 64 / 128 / 256 / 512, weights cold."""
    g = torch.Generator(device="cuda").manual_seed(M + sum(ns) + K)
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
    ws = [(torch.randn(n, K, generator=g, device="cuda") * K**-0.5).to(torch.bfloat16) for n in ns]
    swiglu = op == "swiglu"
    ours = {"linear": lambda ws: (mk.linear(x, ws[0]),), "linears": lambda ws: mk.linears(x, ws),
            "swiglu": lambda ws: (mk.swiglu(x, *ws),)}[op]
    want = ours(ws)
    timed = M in (16, 64, 128, 256, 512)
    nxts = [cold_weights(w) for w in ws] if timed else None
    cold = (lambda: [n() for n in nxts]) if timed else None  # noqa: E731
    row = dict(M=M, N=ns[0] if op == "linear" else list(ns), K=K, op=op)
    if timed:
        if op == "linear":
            row["cublas_us"] = 1e3 * timings(lambda: F.linear(x, nxts[0]()))[1]
        row["triton_us"] = 1e3 * timings(lambda: ours(cold()))[1]
    res = {}
    for cfg in configs(M, quick, swiglu):
        if -(-sum(ns[:1 if swiglu else 3]) // cfg[1]) < cfg[2]:
            continue
        try:
            key = (*cfg[:4], False, swiglu, *cfg[4:])
            kern = kernels.get(key) or kernels.setdefault(key, TMALinear(*key))
            for _ in range(10):  # ten launches, each compared: a race shows as an occasional difference
                ys = [torch.full_like(y, float("nan")) for y in want]
                kern(x, ws, ys)
                same = all(torch.equal(y.view(torch.int16), w.view(torch.int16)) for y, w in zip(ys, want))
                if not same:
                    break
            r = dict(same=same)
            if not same:
                r["differ"] = sum(int((y.view(torch.int16) != w.view(torch.int16)).sum()) for y, w in zip(ys, want))
                r["err"] = max((y.float() - w.float()).abs().max().item() for y, w in zip(ys, want))
            if timed and same:
                r["us"] = 1e3 * timings(lambda kern=kern, ys=ys: kern(x, cold(), ys))[1]  # noqa: B023
        except Exception as e:  # noqa: BLE001 - a failed config is a result
            r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.synchronize()
        res[config_name(cfg)] = r
    if timed and M == 64 and op == "linear":  # the K chains alone (no loads after the first S stages), C = 1
        for tag, key in [(f"chain_n{bn}", (1, bn, 1, 8, True, False, 0)) for bn in (16, 32, 64)] + [
                ("chain_mma_m4", (1, 32, 1, 8, True, False, 4, 1)), ("chain_mma_w4", (1, 8, 1, 8, True, False, 1, 4))]:
            try:
                kern = kernels.get(key) or kernels.setdefault(key, TMALinear(*key))
                ys = [torch.empty_like(want[0])]
                res[tag] = dict(us=1e3 * timings(lambda kern=kern, ys=ys: kern(x, ws, ys))[1])  # noqa: B023
            except Exception as e:  # noqa: BLE001
                res[tag] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    row["cfgs"] = res
    timed_ok = [(v["us"], k) for k, v in res.items() if "us" in v and v.get("same") and not k.startswith("chain")]
    best = {kind: min(((u, k) for u, k in timed_ok if ("_m" in k) == (kind == "mma.sync")), default=None)
            for kind in ("wgmma", "mma.sync")}
    bad = [k for k, v in res.items() if not v.get("same") and not k.startswith("chain")]
    chain = {k: round(v["us"], 1) for k, v in res.items() if k.startswith("chain") and "us" in v}
    n_cfg = len(res) - len(chain)
    msg = f"{op:7} M={M:4} N={str(row['N']):18} K={K:5}: {n_cfg - len(bad)}/{n_cfg} same bits"
    if bad:
        msg += f" (not: {bad[:4]} {res[bad[0]]})"
    if timed:
        msg += f"; cuBLAS {row['cublas_us']:.1f} us," if "cublas_us" in row else ";"
        msg += f" Triton {row['triton_us']:.1f}"
        for kind, b in best.items():
            if b:
                msg += f", {kind} {b[1]} {b[0]:.1f} ({row['triton_us'] / b[0]:.2f}x Triton)"
        if chain:
            msg += f"; K chain alone {chain}"
    print(msg, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tma_linear_probe.json")
    ap.add_argument("--ms", type=int, nargs="+", default=[64, 1, 37, 128, 256, 512])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fused", action="store_true", help="also q|k|v (linears) and gate|up (swiglu) at M <= 64")
    ap.add_argument("--smoke", action="store_true", help="clusters of 1, 2, 4 at one shape, bits only (a hang shows "
                    "early)")
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("tma_linear_probe: needs a CUDA GPU of compute capability 9.0 (Hopper: TMA, wgmma)")
    import miles_kernels as mk

    kernels: dict[tuple, TMALinear] = {}
    if a.smoke:
        x = torch.randn(64, 2048, device="cuda").to(torch.bfloat16)
        w = (torch.randn(1024, 2048, device="cuda") * 2048**-0.5).to(torch.bfloat16)
        want = mk.linear(x, w)
        for c, (bn, mt, wm) in [*itertools.product((1, 2, 4), ((16, 0, 1), (32, 4, 1))), (8, (8, 1, 4))]:
            y = torch.full_like(want, float("nan"))
            TMALinear(1, bn, c, 8, mt=mt, wm=wm)(x, w, y)
            torch.cuda.synchronize()
            same = torch.equal(y.view(torch.int16), want.view(torch.int16))
            print(f"smoke: {config_name((1, bn, c, 8, mt, wm))} ({'mma.sync' if mt else 'wgmma'}): same bits {same},"
                  f" max diff"
                  f" {(y.float() - want.float()).abs().max().item():.3g}", flush=True)
        return
    rows = []
    for M in a.ms:
        todo = [("linear", (n,), k) for n, k in SHAPES_06 + SHAPES_8]
        if a.fused and M <= 64:
            todo += FUSED
        for op, ns, K in todo:
            rows.append(probe_row(mk, kernels, M, op, ns, K, a.quick))
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
