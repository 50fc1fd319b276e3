"""Does Triton's Hopper warp specialization pay for an attention forward on this GPU?

    python tools/bench/ws_probe.py OUT.json

A plain (non-causal) attention forward written the way our training kernel walks its KV blocks
(64-key blocks, K/V by TMA, fixed-point row sums, fma updates), one program per 64 query rows
and head, 0.6B heads (16 query / 8 kv, head_dim 128) at L = 4k and 16k; timed from CUDA graph
replays against flash's (SDPA's) non-causal varlen forward on the same tensors. Variants:

    plain       tl.range over the blocks, software pipelining only (what our kernels compile to)
    ws          the same loop with warp_specialize=True
    ws_split2   warp_specialize over pairs of blocks, each pair's state merged into the total
                (a split of 2 blocks: the merge in the loop body, no branch; an `if` that merges
                every SPLIT_BLOCKS blocks keeps Triton from specializing the loop)

For each: whether the compiler specialized it (`setmaxnreg` in the PTX, threads a program), shared
memory, us, TFLOP/s, x flash, and the largest difference from flash's output. A probe of the
compiler, not a kernel of ours: it decides whether restructuring the training forward's walk for
warp specialization is worth its numerics change (a split of 2 blocks is not KV_SPLIT's 4).
"""

import json
import re
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

H, K, D, BM, BN = 16, 8, 128, 64, 64


@triton.jit
def _block(q, k_desc, v_desc, row, col, m, l, acc, qk_scale):
    k = k_desc.load([row, col])
    qk = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
    alpha = tl.exp2(m - m_new)
    ps = tl.sum((p + 1.0).to(tl.int32, bitcast=True) - 0x3F800000, 1).to(tl.float32) * 1.1920928955078125e-07
    l = tl.fma(l, alpha, ps)
    acc = tl.dot(p.to(k.dtype), v_desc.load([row, col]), acc * alpha[:, None])
    return m_new, l, acc


@triton.jit
def _probe_kernel(q_desc, k_desc, v_desc, o_ptr, stride_o, L, qk_scale, G: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, D: tl.constexpr, WAY: tl.constexpr):
    m0 = tl.program_id(0) * BM
    h = tl.program_id(1)
    q = q_desc.load([m0, h * D])
    col = (h // G) * D
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    if WAY == "plain":
        for j in tl.range(0, L // BN):
            m, l, acc = _block(q, k_desc, v_desc, j * BN, col, m, l, acc, qk_scale)
    elif WAY == "ws":
        for j in tl.range(0, L // BN, warp_specialize=True):
            m, l, acc = _block(q, k_desc, v_desc, j * BN, col, m, l, acc, qk_scale)
    else:  # ws_split2
        for s in tl.range(0, L // (2 * BN), warp_specialize=True):
            m_s = tl.full((BM,), float("-inf"), tl.float32)
            l_s = tl.zeros((BM,), tl.float32)
            acc_s = tl.zeros((BM, D), tl.float32)
            for b in tl.static_range(2):
                m_s, l_s, acc_s = _block(q, k_desc, v_desc, (2 * s + b) * BN, col, m_s, l_s, acc_s, qk_scale)
            m_new = tl.maximum(m, m_s)
            a, c = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
            l = tl.fma(l, a, l_s * c)
            acc = tl.fma(acc, tl.broadcast_to(a[:, None], acc.shape), acc_s * c[:, None])
            m = m_new
    rows = m0 + tl.arange(0, BM)
    cols = h * D + tl.arange(0, D)
    tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], (acc / l[:, None]).to(o_ptr.dtype.element_ty))


def _graph_us(fn) -> float:
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    rows = []
    for L in (4096, 16384):
        gen = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(L, H, D, generator=gen, device="cuda").to(torch.bfloat16)
        k, v = (torch.randn(L, K, D, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        scale = D**-0.5
        flash = lambda: torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, L, L, 0.0, False, False,  # noqa: E731
                                                                 scale=scale)[0]
        ref, flash_us = flash().float(), _graph_us(flash)
        tflop = 4 * H * L * L * D / 1e12
        qd = TensorDescriptor(q.view(L, H * D), [L, H * D], [H * D, 1], [BM, D])
        kd, vd = (TensorDescriptor(x.view(L, K * D), [L, K * D], [K * D, 1], [BN, D]) for x in (k, v))
        for way in ("plain", "ws", "ws_split2"):
            row = dict(L=L, way=way, flash_us=flash_us)
            o = torch.empty_like(q)
            run = lambda: _probe_kernel[(L // BM, H)](qd, kd, vd, o, H * D, L, scale * 1.4426950408889634,  # noqa: E731
                                                      G=H // K, BM=BM, BN=BN, D=D, WAY=way, num_warps=4, num_stages=2)
            try:
                kernel = run()
                torch.cuda.synchronize()
                ptx = kernel.asm["ptx"]
                row.update(specialized=ptx.count("setmaxnreg") > 0, shared=kernel.metadata.shared,
                           threads=int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1)),
                           max_diff=(o.float() - ref).abs().max().item(), us=_graph_us(run))
                row.update(tflops=tflop / row["us"] * 1e6, x_flash=flash_us / row["us"])
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit is a row too
                row["error"] = str(e)[-300:]
            rows.append(row)
            json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, rows=rows),
                      open(sys.argv[1], "w"), indent=1)
            print(f"L={L:6} {way:10} " + (f"ERROR {row['error'][-150:]}" if "error" in row else
                  f"specialized={int(row['specialized'])} threads={row['threads']} smem={row['shared'] // 1024} KB "
                  f"{row['us']:8.1f} us {row['tflops']:5.0f} TFLOP/s {row['x_flash']:.2f}x flash "
                  f"(flash {flash_us:.1f} us) max diff {row['max_diff']:.3g}"), flush=True)


if __name__ == "__main__":
    main()
