"""A decode attention candidate with swapped operands, for measurement only (not on any path).

The decode tile of `miles_kernels._triton.paged_attention` is 64 query rows (token x head)
of which G = H / K are real at decode (2 for Qwen3-0.6B, 4 for 8B): its MMAs are 64 rows tall
for 2-4 rows of work. Here the KV block's 64 tokens are the MMA's M and the G query rows
(padded to 16) its N: S^T = K Q^T ([64, 16]), acc^T += V^T P^T ([D, 16]); the same blocks
(KV_BLOCK), splits (KV_SPLIT), online softmax and merge as the kernel's. Its bits differ
from the kernel's where reductions run along the other axis (the row sums l); this file
measures whether the tile is worth a numerics in which prefill and decode share that order:

    python tools/bench/attn_sweep.py OUT.json --swapped     # GPU: time vs the kernel and SDPA
    TRITON_INTERPRET=1 python tools/bench/attn_swapped.py   # CPU: values vs float64
"""

import os
import sys

import torch
import triton
import triton.language as tl

from miles_kernels._triton.paged_attention import KV_BLOCK, KV_SPLIT, _LOG2E, _exact_sum


@triton.jit
def _swapped_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, kv_lens_ptr, bt_ptr, qk_scale, n_kv_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_ks, stride_kk, stride_bt,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr, PAGE: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr, PRECISION: tl.constexpr, L_SUM: tl.constexpr,
):
    """One program per (sequence, kv head), one query token a sequence; caches [P, PAGE, K, D]
    with PAGE a multiple of BLK; columns r < G of the [*, GP] tiles are the real query heads."""
    bk = tl.program_id(0)
    b = bk // n_kv_heads
    kvh = bk % n_kv_heads
    kv_len = tl.load(kv_lens_ptr + b)
    r = tl.arange(0, GP)
    ds = tl.arange(0, D)
    offs = tl.arange(0, BLK)
    head = kvh * G + r
    q_t = tl.load(q_ptr + b.to(tl.int64) * stride_qt + head[None, :] * stride_qh + ds[:, None],
                  mask=(r < G)[None, :], other=0.0)  # [D, GP]
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    n_blocks = tl.cdiv(kv_len, BLK)
    m = tl.full((GP,), float("-inf"), tl.float32)
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((D, GP), tl.float32)
    one = tl.where((tl.arange(0, 64)[:, None] == 0) & (offs[None, :] >= 0), 1.0, 0.0).to(v_ptr.dtype.element_ty)
    for blk_lo in range(0, n_blocks, SPLIT_BLOCKS):
        m_s = tl.full((GP,), float("-inf"), tl.float32)
        l_s = tl.zeros((GP,), tl.float32)
        acc_s = tl.zeros((D, GP), tl.float32)
        for j in range(blk_lo, tl.minimum(blk_lo + SPLIT_BLOCKS, n_blocks)):
            kv_pos = j * BLK + offs
            ok = kv_pos < kv_len
            page = tl.load(bt_row + (j * BLK) // PAGE).to(tl.int64)
            slot = (j * BLK) % PAGE + offs
            k = tl.load(k_ptr + page * stride_kp + slot[:, None] * stride_ks + kvh * stride_kk + ds[None, :],
                        mask=ok[:, None], other=0.0)  # [BLK, D]
            v_t = tl.load(v_ptr + page * stride_kp + slot[None, :] * stride_ks + kvh * stride_kk + ds[:, None],
                          mask=ok[None, :], other=0.0)  # [D, BLK]
            qk = tl.dot(k, q_t, input_precision=PRECISION)  # [BLK, GP]
            s = tl.where(ok[:, None], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_s, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(tl.where(ok[:, None], tl.fma(qk, qk_scale, -m_safe[None, :]), float("-inf")))
            alpha = tl.exp2(m_s - m_safe)
            pv = p.to(v_t.dtype)
            if L_SUM == "dot":  # row 0 of one-hot @ p: the kernel's "dot" row sums, same order
                ps = tl.sum(tl.dot(one, pv, input_precision=PRECISION), 0)
            elif L_SUM == "exact":
                ps = _exact_sum(p, 0)
            else:
                ps = tl.sum(p, 0)
            l_s = tl.fma(l_s, alpha, ps)
            acc_s = tl.dot(v_t, pv, acc_s * alpha[None, :], input_precision=PRECISION)
            m_s = m_new
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        c = tl.exp2(m_s - m_safe)
        l = tl.fma(l, a, l_s * c)
        acc = tl.fma(acc, tl.broadcast_to(a[None, :], acc.shape), acc_s * c[None, :])
        m = m_new
    o = acc / l[None, :]
    tl.store(o_ptr + b.to(tl.int64) * stride_ot + head[None, :] * stride_oh + ds[:, None],
             o.to(o_ptr.dtype.element_ty), mask=(r < G)[None, :])


def swapped_decode(q_BHD, k_cache_PSKD, v_cache_PSKD, kv_lens_B, block_table_BP, scale: float,
                   num_warps: int = 4, num_stages: int = 3, row_sum: str = "reduce") -> torch.Tensor:
    """Decode attention of one query token a sequence over a paged cache (the token's K/V
    already written), in the swapped tile."""
    B, H, D = q_BHD.shape
    P, S, K, _ = k_cache_PSKD.shape
    if S % KV_BLOCK or v_cache_PSKD.stride() != k_cache_PSKD.stride() or D & (D - 1):
        raise ValueError("swapped_decode: pages a multiple of KV_BLOCK, K and V caches of one layout, D a power of 2")
    G = H // K
    o = torch.empty_like(q_BHD)
    bt = block_table_BP.to(torch.int32).contiguous()
    _swapped_decode_kernel[(B * K,)](
        q_BHD, k_cache_PSKD, v_cache_PSKD, o, kv_lens_B.to(torch.int32).contiguous(), bt, scale * _LOG2E, K,
        q_BHD.stride(0), q_BHD.stride(1), o.stride(0), o.stride(1),
        k_cache_PSKD.stride(0), k_cache_PSKD.stride(1), k_cache_PSKD.stride(2), bt.stride(0),
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLK=KV_BLOCK, PAGE=S, SPLIT_BLOCKS=KV_SPLIT // KV_BLOCK,
        PRECISION="ieee" if q_BHD.dtype == torch.float32 else "tf32", L_SUM=row_sum, num_warps=num_warps,
        num_stages=num_stages,
    )
    return o


def reference(q_BHD, k_cache_PSKD, v_cache_PSKD, kv_lens_B, block_table_BP, scale: float) -> torch.Tensor:
    """float64 attention of each sequence's one query over its first kv_len cached tokens."""
    B, H, D = q_BHD.shape
    S, K = k_cache_PSKD.shape[1], k_cache_PSKD.shape[2]
    out = []
    for b in range(B):
        n = int(kv_lens_B[b])
        pos = torch.arange(n)
        pages = block_table_BP[b].long()[pos // S]
        k = k_cache_PSKD[pages, pos % S].double().repeat_interleave(H // K, 1)  # [n, H, D]
        v = v_cache_PSKD[pages, pos % S].double().repeat_interleave(H // K, 1)
        w = (torch.einsum("hd,nhd->hn", q_BHD[b].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


def check() -> None:
    """Values vs float64 on CPU (TRITON_INTERPRET=1, fp32): several splits, a last block cut
    short, pages out of order, GQA groups of 2 and 4."""
    g = torch.Generator().manual_seed(0)
    for H, K, lens in ((4, 2, (1, 64, 70, 300)), (8, 2, (130, 5))):
        D, S = 16, KV_BLOCK
        B, width = len(lens), -(-max(lens) // S)
        pages = torch.randperm(B * width + 3, generator=g)[: B * width].view(B, width)
        kc = torch.randn(B * width + 3, S, K, D, generator=g)
        vc = torch.randn(B * width + 3, S, K, D, generator=g)
        q = torch.randn(B, H, D, generator=g)
        kv = torch.tensor(lens)
        for row_sum in ("reduce", "dot", "exact"):
            got = swapped_decode(q, kc, vc, kv, pages, D**-0.5, row_sum=row_sum)
            err = (got.double() - reference(q, kc, vc, kv, pages, D**-0.5)).abs().max().item()
            assert err < 1e-4, f"swapped_decode H={H} K={K} lens={lens} row_sum={row_sum}: max abs err {err}"
    print("swapped_decode: ok")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("the check runs on the CPU: TRITON_INTERPRET=1 python tools/bench/attn_swapped.py")
    check()
