"""Pieces the paged attention kernel and the swapped decode tile share."""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exact_sum(p, AXIS: tl.constexpr):
    """Sum of p in [0, 1] along AXIS (at most 64 terms) whose value does not depend on the
    order: p = hi + lo + e with hi a multiple of 2**-18, lo of 2**-36 (|lo| <= 2**-19), |e| <=
    2**-37; each part's partial sums fit fp32's 24 bits, so both sums are exact in any order."""
    tl.static_assert(p.shape[AXIS] <= 64)
    hi = (p + 48.0) - 48.0  # 48 = 1.5 * 2**5: the add rounds p to a multiple of 2**-18
    r = p - hi  # exact
    lo = (r + 0.00018310546875) - 0.00018310546875  # 1.5 * 2**-13: to a multiple of 2**-36
    return tl.sum(hi, AXIS) + tl.sum(lo, AXIS)


@triton.jit
def fixed_sum(p, AXIS: tl.constexpr):
    """Sum of p in [0, 1] along AXIS (at most 64 terms) in fixed point, so in any order the same
    value: p + 1 lies in [1, 2], spaced 2**-23, so its bits minus 1.0's are round(p * 2**23);
    those integers (<= 2**29 summed) add exactly. Each term is off by at most 2**-24."""
    tl.static_assert(p.shape[AXIS] <= 64)
    n = (p + 1.0).to(tl.int32, bitcast=True) - 0x3F800000
    return tl.sum(n, AXIS).to(tl.float32) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def seq_and_head(cu_ptr, kv_lens_ptr, n_kv_heads):
    """Program axis 0 as a (sequence, kv head) pair: (pair, sequence b, kv head, the chunk's
    first query row, its length, the sequence's KV length)."""
    bk = tl.program_id(0)
    b = bk // n_kv_heads
    q_lo = tl.load(cu_ptr + b)
    return bk, b, bk % n_kv_heads, q_lo, tl.load(cu_ptr + b + 1) - q_lo, tl.load(kv_lens_ptr + b)


@triton.jit
def kv_tma(j, kv_base, k_desc, v_desc, bt_row_ptr, kvh, ok, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr,
           CONTIG: tl.constexpr, MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    """K and V [ATTN_BLK, BLOCK_D] of KV block j by TMA: descriptors over packed K/V [T, K * D]
    (CONTIG) or a paged cache [P * PAGE, K * D] (the block inside one page). With MASK the rows
    past kv_len (the next sequence's tokens, a page's stale slots, zeros past the tensor) are
    set to zero, as the pointer loads read them: the same values, so the same bits."""
    if CONTIG:
        row = kv_base + j * ATTN_BLK
    else:
        row = tl.load(bt_row_ptr + (j * ATTN_BLK) // PAGE).to(tl.int64) * PAGE + (j * ATTN_BLK) % PAGE
    k = k_desc.load([row.to(tl.int32), kvh * BLOCK_D])
    v = v_desc.load([row.to(tl.int32), kvh * BLOCK_D])
    if MASK:
        k = tl.where(ok[:, None], k, 0.0)
        v = tl.where(ok[:, None], v, 0.0)
    return k, v
