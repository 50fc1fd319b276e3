"""Can a CUDA C++ kernel give our Triton linears' bits? The lever left for the small-batch decode step
(docs/kernel_tuning.md, forty-third run) is CUDA C++ built on the GPU machine: a persistent decode kernel,
cluster-multicast TMA. It must reproduce miles_kernels' linear bit for bit (the trainer's numerics). This
probe compiles, with NVRTC through torch.cuda._compile_kernel, the plainest wgmma kernel: a 64 x 16 output
tile a CTA (one warpgroup), K in steps of 64, each step four `wgmma.mma_async m64n16k16.f32.bf16.bf16` in k
order from shared memory (no swizzle, core matrices of 8 rows x 16 bytes), fp32 accumulation, one rounding
to bf16 at the end: the K walk of the Triton tiles. Both assignments of the two descriptor strides (the
K-direction core-matrix stride as the leading byte offset, or as the stride byte offset) are run; the
right one matches a float64 reference, and the question is whether it equals `linear`'s output exactly.
Then the same tile with its loads in a ring of 4 or 8 cp.async stages (`wgmma_linear_pipe4/8`, the Triton
tile's pipeline) is checked against `linear` and timed beside it and cuBLAS at M 64 (graph-timed, weights
cycled past L2): the baseline a CUDA C++ decode kernel starts from.
The tile's first wgmma either adds A B to the zeroed accumulator or writes D = A B (`first_ab`); they differ
only on a dot product of -0.0 (0.0 + -0.0 = +0.0), so x's row 1 is all -0.0 and w's first 16 rows positive
(every product -0.0) to tell which one `linear` does (the count of -0.0 in that row of its output).

    PYTHONPATH=src:kernels python tools/bench/wgmma_probe.py --out wgmma.json
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)
from linear_sweep import cold_weights  # noqa: E402

SOURCE = r"""
__device__ __forceinline__ unsigned long long gmma_desc(const void* p, unsigned lbo, unsigned sbo) {
    unsigned addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(p));
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16)
        | ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32);  // base offset 0, no swizzle
}

__device__ __forceinline__ unsigned short to_bf16(float f) {  // round to nearest even (finite inputs)
    unsigned u = __float_as_uint(f);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// y[M, N] = x[M, K] @ w[N, K]^T (bf16 as unsigned short), a 64 x 16 tile a CTA of 128 threads, K % 64 == 0.
extern "C" __global__ void __launch_bounds__(128) wgmma_linear(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, unsigned short* __restrict__ y,
    int M, int N, int K, int lbo_k, int first_ab) {
    __shared__ __align__(128) uint4 xs[64 * 8];  // row group g, k chunk c, row r % 8: ((g * 8 + c) * 8 + r % 8)
    __shared__ __align__(128) uint4 ws[16 * 8];
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 16;
    float d[8];
    for (int i = 0; i < 8; ++i) d[i] = 0.f;
    const unsigned kstride = 128, gstride = 8 * 128;  // bytes to the next k chunk, to the next 8-row group
    const unsigned lbo = lbo_k ? kstride : gstride, sbo = lbo_k ? gstride : kstride;
    for (int k0 = 0; k0 < K; k0 += 64) {
        for (int j = 0; j < 4; ++j) {
            int q = tid + 128 * j, r = q / 8, c = q % 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (m0 + r < M) v = *reinterpret_cast<const uint4*>(x + (unsigned long long)(m0 + r) * K + k0 + c * 8);
            xs[((r / 8) * 8 + c) * 8 + r % 8] = v;
        }
        {
            int r = tid / 8, c = tid % 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (n0 + r < N) v = *reinterpret_cast<const uint4*>(w + (unsigned long long)(n0 + r) * K + k0 + c * 8);
            ws[((r / 8) * 8 + c) * 8 + r % 8] = v;
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // this thread's stores, to wgmma's proxy
        __syncthreads();
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        for (int kk = 0; kk < 4; ++kk) {
            unsigned long long da = gmma_desc(&xs[2 * kk * 8], lbo, sbo), db = gmma_desc(&ws[2 * kk * 8], lbo, sbo);
            int acc = !(first_ab && k0 == 0 && kk == 0);  // first_ab: the tile's first wgmma is D = A B
            asm volatile(
                "{ .reg .pred p; setp.ne.b32 p, %10, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
                "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0; }\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                : "l"(da), "l"(db), "r"(acc));
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        __syncthreads();
    }
    const int warp = tid / 32, lane = tid % 32;
    for (int i = 0; i < 8; ++i) {  // the m64nNk16 f32 fragment: 8-column blocks of (row, row + 8) x 2 columns
        int row = m0 + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
        int col = n0 + (lane % 4) * 2 + (i % 2) + 8 * (i / 4);
        if (row < M && col < N) y[(unsigned long long)row * N + col] = to_bf16(d[i]);
    }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {  // bytes 0: zero fill
    unsigned a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(a), "l"(src), "r"(bytes) : "memory");
}

// One K step's x [64 x 64] and w [16 x 64] into a stage (x, then w; core-matrix layout), rows past M / N zeroed.
__device__ __forceinline__ void load_stage(uint4* xs, const unsigned short* x, const unsigned short* w, int m0,
                                           int n0, int M, int N, int K, int k0, int tid) {
    for (int j = 0; j < 4; ++j) {
        int q = tid + 128 * j, r = q / 8, c = q % 8, ok = m0 + r < M;
        cp_async16(&xs[((r / 8) * 8 + c) * 8 + r % 8], x + (ok ? (unsigned long long)(m0 + r) * K + k0 + c * 8 : 0),
                   ok ? 16 : 0);
    }
    int r = tid / 8, c = tid % 8, ok = n0 + r < N;
    cp_async16(&xs[64 * 8 + ((r / 8) * 8 + c) * 8 + r % 8],
               w + (ok ? (unsigned long long)(n0 + r) * K + k0 + c * 8 : 0), ok ? 16 : 0);
}

// wgmma_linear's tile and K walk with the loads in a ring of `stages` cp.async stages (the Triton tile's
// pipeline): x [64 x 64] and w [16 x 64] a stage in the same core-matrix layout, dynamic shared memory.
template <int stages>
__device__ __forceinline__ void pipe_tile(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ w, unsigned short* __restrict__ y,
    int M, int N, int K) {
    extern __shared__ __align__(128) uint4 smem[];
    const int XS = 64 * 8, SS = XS + 16 * 8;  // uint4 a stage: x, then w
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 16;
    const int nk = K / 64;
    float d[8];
    for (int i = 0; i < 8; ++i) d[i] = 0.f;
    for (int s = 0; s < stages - 1; ++s) {
        if (s < nk) load_stage(smem + s * SS, x, w, m0, n0, M, N, K, s * 64, tid);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int ks = 0; ks < nk; ++ks) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(stages - 2) : "memory");  // stage ks's group done
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // stage ks loaded by all; stage ks - 1's wgmmas done by all (waited below)
        int nxt = ks + stages - 1;
        if (nxt < nk) load_stage(smem + (nxt % stages) * SS, x, w, m0, n0, M, N, K, nxt * 64, tid);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        const uint4* xs = smem + (ks % stages) * SS;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        for (int kk = 0; kk < 4; ++kk) {
            unsigned long long da = gmma_desc(&xs[2 * kk * 8], 128, 1024);  // K stride as the leading offset
            unsigned long long db = gmma_desc(&xs[XS + 2 * kk * 8], 128, 1024);
            asm volatile(
                "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
                "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, 1, 1, 1, 0, 0;\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                : "l"(da), "l"(db));
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    const int warp = tid / 32, lane = tid % 32;
    for (int i = 0; i < 8; ++i) {
        int row = m0 + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
        int col = n0 + (lane % 4) * 2 + (i % 2) + 8 * (i / 4);
        if (row < M && col < N) y[(unsigned long long)row * N + col] = to_bf16(d[i]);
    }
}

#define PIPE(S) extern "C" __global__ void __launch_bounds__(128) wgmma_linear_pipe##S( \
    const unsigned short* x, const unsigned short* w, unsigned short* y, int M, int N, int K) { \
    pipe_tile<S>(x, w, y, M, N, K); }
PIPE(4)
PIPE(8)
"""

TIMED = [(64, 1024, 2048), (64, 1024, 3072), (64, 4096, 1024), (64, 6144, 1024), (64, 4096, 4096), (64, 4096, 12288)]
STAGE_BYTES = (64 + 16) * 64 * 2  # x and w of one K step
SHAPES = [(64, 1024, 2048), (37, 1024, 2048), (64, 1024, 3072), (64, 4096, 1024), (128, 4096, 4096),
          (256, 6144, 1024), (1, 4096, 12288)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="wgmma_probe.json")
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("wgmma_probe: needs a CUDA GPU of compute capability 9.0 (Hopper: wgmma)")
    import miles_kernels as mk

    kernel = torch.cuda._compile_kernel(SOURCE, "wgmma_linear", compute_capability="90a")
    rows = []
    for M, N, K in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(M + N + K)
        x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
        w = (torch.randn(N, K, generator=g, device="cuda") * K**-0.5).to(torch.bfloat16)
        if M > 1:  # row 1 all -0.0 against 16 all-positive weight rows: products -0.0, sums -0.0 or +0.0
            x[1] = -0.0
            w[:16] = w[:16].abs()
        want = mk.linear(x, w)
        ref = x.double() @ w.double().T
        row = dict(M=M, N=N, K=K, linear_err=(want.double() - ref).abs().max().item())
        if M > 1:
            row["linear_row1_negative_zeros"] = int(torch.signbit(want[1, :16]).sum().item())
        for lbo_k, first_ab in ((1, 0), (0, 0), (1, 1)):
            y = torch.full_like(want, float("nan"))
            kernel(grid=(N // 16, (M + 63) // 64, 1), block=(128, 1, 1),
                   args=[x.view(torch.int16), w.view(torch.int16), y.view(torch.int16), M, N, K, lbo_k, first_ab])
            torch.cuda.synchronize()
            bits = y.view(torch.int16) != want.view(torch.int16)  # -0.0 vs +0.0 counts
            row[f"lbo_k{lbo_k}_first_ab{first_ab}"] = dict(
                err=(y.double() - ref).abs().max().item(), same=not bool(bits.any()), differ=int(bits.sum().item()))
        rows.append(row)
        print(f"M={M:4} N={N:5} K={K:5}: linear vs fp64 {row['linear_err']:.3g}, row 1's -0.0s "
              f"{row.get('linear_row1_negative_zeros', '-')}; "
              + "; ".join(f"{k}: vs fp64 {v['err']:.3g}, same bits {int(v['same'])} ({v['differ']} differ)"
                          for k, v in row.items() if k.startswith("lbo")), flush=True)
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)
    pipes = {}
    for stages in (4, 8):
        kern = torch.cuda._compile_kernel(SOURCE, f"wgmma_linear_pipe{stages}", compute_capability="90a")
        if stages * STAGE_BYTES >= 48 << 10:  # dynamic shared memory past 48 KB is opted into
            if not hasattr(kern, "set_shared_memory_config"):
                print(f"wgmma_probe: this torch cannot raise a kernel's shared memory; {stages} stages skipped")
                continue
            kern.set_shared_memory_config(stages * STAGE_BYTES)
        pipes[stages] = kern
    timed = []
    for M, N, K in TIMED:
        g = torch.Generator(device="cuda").manual_seed(M + N + K)
        x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
        w = (torch.randn(N, K, generator=g, device="cuda") * K**-0.5).to(torch.bfloat16)
        nxt = cold_weights(w)

        want = mk.linear(x, w)
        y = torch.empty_like(want)
        row = dict(M=M, N=N, K=K, cublas_us=1e3 * timings(lambda: F.linear(x, nxt()))[1],  # noqa: B023
                   triton_us=1e3 * timings(lambda: mk.linear(x, nxt()))[1])  # noqa: B023
        for stages, kern in pipes.items():
            def run(wt, kern=kern, stages=stages):
                kern(grid=(N // 16, (M + 63) // 64, 1), block=(128, 1, 1), shared_mem=stages * STAGE_BYTES,
                     args=[x.view(torch.int16), wt.view(torch.int16), y.view(torch.int16), M, N, K])  # noqa: B023
            run(w)
            torch.cuda.synchronize()
            row[f"pipe{stages}_same"] = bool(torch.equal(y.view(torch.int16), want.view(torch.int16)))
            row[f"pipe{stages}_us"] = 1e3 * timings(lambda run=run: run(nxt()))[1]  # noqa: B023
        timed.append(row)
        print(f"M={M} N={N:5} K={K:5} (graph-timed, weights cold): cuBLAS {row['cublas_us']:6.1f} us, Triton "
              f"{row['triton_us']:6.1f}, " + ", ".join(
                  f"CUDA {s} stages {row[f'pipe{s}_us']:6.1f} (same bits {int(row[f'pipe{s}_same'])})" for s in pipes),
              flush=True)
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, timed=timed), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
