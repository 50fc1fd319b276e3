"""Pieces the attention kernels share (paged prefill, the swapped decode tile, the backward)."""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

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
    those integers (<= 2**29 summed) add exactly. Each term is off by at most 2**-24. The bits
    are summed as they are and 1.0's taken off once: the same integer (int32 sums wrap mod 2**32
    and the true sum fits), one subtraction a row instead of one a term."""
    tl.static_assert(p.shape[AXIS] <= 64)
    ONES: tl.constexpr = (p.shape[AXIS] * 0x3F800000 + 2**31) % 2**32 - 2**31  # N x 1.0's bits, as int32
    n = tl.sum((p + 1.0).to(tl.int32, bitcast=True), AXIS) - ONES
    return n.to(tl.float32) * 1.1920928955078125e-07  # 2**-23


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


def tma_descriptors(xs: tuple[torch.Tensor, ...], rows: int, enabled: bool) -> tuple | None:
    """Host TMA descriptors of tensors [..., n, D] (packed [T, n, D] or a paged cache [P, S, n, D])
    as [rows of the leading axes, n * D] in blocks of `rows` x D, or None where `enabled` is off or
    the layout does not allow them (D a power of two >= 16, unit last stride, heads D apart, 16-byte
    aligned base and row stride, leading axes that flatten, any rows; on CUDA 16-bit dtypes, the
    interpreter takes any)."""
    *lead, n, D = xs[0].shape
    total = math.prod(lead)
    if not enabled or total == 0 or D < 16 or D & (D - 1) \
            or (xs[0].device.type == "cuda" and xs[0].element_size() != 2):
        return None
    for t in xs:
        if t.stride(-1) != 1 or t.stride(-2) != D or (t.stride(-3) * t.element_size()) % 16 or t.data_ptr() % 16 \
                or (t.dim() == 4 and t.stride(0) != t.shape[1] * t.stride(1)):
            return None
    return tuple(TensorDescriptor(t, [total, n * D], [t.stride(-3), 1], [rows, D]) for t in xs)
