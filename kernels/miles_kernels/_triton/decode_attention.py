"""Decode attention in the swapped tile, for the paged kernel's short (decode, verify) chunks.

The paged kernel's decode tile is 64 query rows (token x head) of which G = H / K are real at
decode: its MMAs are 64 rows tall for 2-4 rows of work. Here the KV block's tokens are the
MMA's M and the chunk's query rows (padded to 16) its N: S^T = K Q^T, acc^T += V^T P^T, in the
paged kernel's blocks, splits, masks and merges. Every product is summed in the kernel's
order (wgmma gives one sum whichever operand a matrix is); the row sums l need a shared
order (paged_attention.ROW_SUM "dot", "exact" or "fixed"), so decode == prefill bitwise.
paged_attention._launch takes this path under DECODE_TILE "swapped", or "auto" (the default)
from SWAPPED_MIN_PAIRS (sequence, kv head) pairs on (measured by tools/bench/attn_sweep.py --rowsum).
"""

import triton
import triton.language as tl

from miles_kernels._triton.attn_parts import LN2, exact_sum, fixed_sum, kv_tma, seq_and_head
from miles_kernels._triton.gdc import gdc_release, gdc_wait
from miles_kernels._triton.launch import fast_launch


@triton.jit
def _kv_load_t(j, kv_pos, ok, k_ptr, v_ptr, bt_row_ptr, kvh, offs, ds, stride_kp, stride_ks, stride_kk, stride_vp,
               stride_vs, stride_vk, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr, MASK: tl.constexpr):
    """K [ATTN_BLK, BLOCK_D] and V^T of KV block j by pointers (zeros past kv_len)."""
    if PAGE % ATTN_BLK == 0:  # the block lies in one page
        page = tl.load(bt_row_ptr + (j * ATTN_BLK) // PAGE).to(tl.int64)
        slot = (j * ATTN_BLK) % PAGE + offs
    else:  # the block spans pages: gather each token's page
        page = tl.load(bt_row_ptr + kv_pos // PAGE, mask=ok, other=0).to(tl.int64)
        slot = kv_pos % PAGE
    k_off = page * stride_kp + slot * stride_ks
    v_off = page * stride_vp + slot * stride_vs
    if MASK:
        k = tl.load(k_ptr + kvh * stride_kk + k_off[:, None] + ds[None, :], mask=ok[:, None], other=0.0)
        vT = tl.load(v_ptr + kvh * stride_vk + v_off[None, :] + ds[:, None], mask=ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptr + kvh * stride_kk + k_off[:, None] + ds[None, :])
        vT = tl.load(v_ptr + kvh * stride_vk + v_off[None, :] + ds[:, None])
    return k, vT


@triton.jit
def _kv_block_t(
    qT, m, l, accT, j, pos, kv_len, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, offs, ds, one,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    PAGE: tl.constexpr, ATTN_BLK: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr, L_SUM: tl.constexpr,
    BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):
    """paged_attention._kv_block with the block's tokens along axis 0: same values."""
    kv_pos = j * ATTN_BLK + offs
    ok = kv_pos < kv_len
    if TMA:  # k_ptr/v_ptr: descriptors of the caches as [P * PAGE, K * D]
        k, v = kv_tma(j, 0, k_ptr, v_ptr, bt_row_ptr, kvh, ok, PAGE, ATTN_BLK, False, MASK, BLOCK_D)
        vT = tl.trans(v)
    else:
        k, vT = _kv_load_t(j, kv_pos, ok, k_ptr, v_ptr, bt_row_ptr, kvh, offs, ds,
                           stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, PAGE, ATTN_BLK, MASK)
    qk = tl.dot(k, qT, input_precision=PRECISION)  # [ATTN_BLK, ROWS]
    if MASK:
        keep = (kv_pos[:, None] <= pos[None, :]) & ok[:, None]
        qk_max = tl.max(tl.where(keep, qk, float("-inf")), 0)
    else:
        qk_max = tl.max(qk, 0)
    m_new = tl.maximum(m, qk_max * qk_scale)  # as paged_attention._kv_block: the same bits
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.fma(qk, qk_scale, -m_safe[None, :])
    if MASK:
        e = tl.where(keep, e, float("-inf"))
    p = tl.exp2(e)
    alpha = tl.exp2(m - m_safe)
    pv = p.to(vT.dtype)
    if L_SUM == "dot":  # row 0 of one-hot @ p: the paged kernel's column 0 of p @ one-hot
        ps = tl.sum(tl.dot(one, pv, input_precision=PRECISION), 0)
    elif L_SUM == "fixed":
        ps = fixed_sum(p, 0)
    else:
        ps = exact_sum(p, 0)
    l = tl.fma(l, alpha, ps)
    accT = tl.dot(vT, pv, tl.fma(accT, tl.broadcast_to(alpha[None, :], accT.shape), 0.0),
                  input_precision=PRECISION)  # as paged_attention._kv_block
    return m_new, l, accT


@triton.jit
def _split_state_t(
    qT, pos, pos_min, kv_len, blk_lo, blk_hi, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr,
    PRECISION: tl.constexpr, L_SUM: tl.constexpr, TMA: tl.constexpr,
):
    """paged_attention._split_state, transposed: blocks [blk_lo, blk_hi) from an empty state."""
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    accT = tl.zeros((BLOCK_D, ROWS), tl.float32)
    offs = tl.arange(0, ATTN_BLK)
    ds = tl.arange(0, BLOCK_D)
    one = tl.where((tl.arange(0, 64)[:, None] == 0) & (offs[None, :] >= 0), 1.0, 0.0).to(qT.dtype)
    n_full = tl.minimum((pos_min + 1) // ATTN_BLK, kv_len // ATTN_BLK)
    full_hi = tl.maximum(tl.minimum(blk_hi, n_full), blk_lo)
    for j in range(blk_lo, full_hi):
        m, l, accT = _kv_block_t(qT, m, l, accT, j, pos, kv_len, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, offs, ds,
                                 one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                                 PAGE, ATTN_BLK, PRECISION, False, L_SUM, BLOCK_D, TMA)
    for j in range(full_hi, blk_hi):
        m, l, accT = _kv_block_t(qT, m, l, accT, j, pos, kv_len, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, offs, ds,
                                 one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                                 PAGE, ATTN_BLK, PRECISION, True, L_SUM, BLOCK_D, TMA)
    return m, l, accT


@triton.jit
def _merge_t(m, l, accT, m_s, l_s, acc_s):
    """paged_attention._merge along the other axis: the same elementwise operations."""
    m_new = tl.maximum(m, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m - m_safe)
    c = tl.exp2(m_s - m_safe)
    l = tl.fma(l, a, l_s * c)
    accT = tl.fma(accT, tl.broadcast_to(a[None, :], accT.shape), acc_s * c[None, :])
    return m_new, l, accT


@triton.jit
def _end_split_t(m, l, accT, m_s, l_s, acc_s):
    """paged_attention._end_split along the other axis (acc_s emptied by the next block's rescale)."""
    m, l, accT = _merge_t(m, l, accT, m_s, l_s, acc_s)
    return m, l, accT, tl.full(m_s.shape, float("-inf"), tl.float32), tl.zeros(l_s.shape, tl.float32), acc_s


@triton.jit
def _walk_t(
    qT, pos, pos_min, kv_len, n_blocks, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr, PRECISION: tl.constexpr, L_SUM: tl.constexpr, TMA: tl.constexpr,
):
    """paged_attention._walk, transposed: every split in one loop, merged at each split's end."""
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    accT = tl.zeros((BLOCK_D, ROWS), tl.float32)
    m_s, l_s, acc_s = m, l, accT
    offs = tl.arange(0, ATTN_BLK)
    ds = tl.arange(0, BLOCK_D)
    one = tl.where((tl.arange(0, 64)[:, None] == 0) & (offs[None, :] >= 0), 1.0, 0.0).to(qT.dtype)
    full_hi = tl.minimum(tl.minimum((pos_min + 1) // ATTN_BLK, kv_len // ATTN_BLK), n_blocks)
    for j in range(0, full_hi):
        m_s, l_s, acc_s = _kv_block_t(qT, m_s, l_s, acc_s, j, pos, kv_len, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale,
                                      offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                                      PAGE, ATTN_BLK, PRECISION, False, L_SUM, BLOCK_D, TMA)
        if (j + 1) % SPLIT_BLOCKS == 0:
            m, l, accT, m_s, l_s, acc_s = _end_split_t(m, l, accT, m_s, l_s, acc_s)
    for j in range(full_hi, n_blocks):
        m_s, l_s, acc_s = _kv_block_t(qT, m_s, l_s, acc_s, j, pos, kv_len, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale,
                                      offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                                      PAGE, ATTN_BLK, PRECISION, True, L_SUM, BLOCK_D, TMA)
        if (j + 1) % SPLIT_BLOCKS == 0:
            m, l, accT, m_s, l_s, acc_s = _end_split_t(m, l, accT, m_s, l_s, acc_s)
    if n_blocks % SPLIT_BLOCKS != 0:
        m, l, accT = _merge_t(m, l, accT, m_s, l_s, acc_s)
    return m, l, accT


@fast_launch
@triton.jit
def decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, cu_ptr, kv_lens_ptr, bt_ptr,
    qk_scale, n_kv_heads, n_splits_max,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lh,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    ATTN_BLK: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, SPLIT_PARALLEL: tl.constexpr, PART_ROWS: tl.constexpr,
    PRECISION: tl.constexpr, STORE_LSE: tl.constexpr, L_SUM: tl.constexpr, ONE_LOOP: tl.constexpr,
    TMA: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    """One program per (sequence, kv head) (x split programs on axis 1): the chunk's q_len x
    G_PAD rows as the tile's columns. Split states go to the paged kernel's buffers for its
    combine kernel; otherwise the splits merge here as the paged kernel merges them. USE_GDC (PDL,
    gdc.py): the kernel before waited for first, the next released after the walk."""
    gdc_wait(USE_GDC)
    bk, b, kvh, q_lo, q_len, kv_len = seq_and_head(cu_ptr, kv_lens_ptr, n_kv_heads)
    if q_len <= 0:
        return
    r = tl.arange(0, ROWS)
    tok = r // G_PAD
    head = kvh * G + r % G_PAD
    row_ok = (r % G_PAD < G) & (tok < q_len)
    pos = kv_len - q_len + tok
    pos_min = kv_len - q_len
    n_blocks = (kv_len - 1) // ATTN_BLK + 1
    ds = tl.arange(0, BLOCK_D)
    t_idx = (q_lo + tok).to(tl.int64)
    qT = tl.load(q_ptr + t_idx[None, :] * stride_qt + head[None, :] * stride_qh + ds[:, None],
                 mask=row_ok[None, :], other=0.0)  # [BLOCK_D, ROWS]
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
    if SPLIT_PARALLEL:
        keep = r < PART_ROWS
        for split in range(tl.program_id(1), tl.cdiv(n_blocks, SPLIT_BLOCKS), tl.num_programs(1)):
            blk_lo = split * SPLIT_BLOCKS
            m, l, accT = _split_state_t(
                qT, pos, pos_min, kv_len, blk_lo, tl.minimum(blk_lo + SPLIT_BLOCKS, n_blocks), k_ptr, v_ptr,
                bt_row_ptr, kvh, qk_scale, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                ROWS, BLOCK_D, PAGE, ATTN_BLK, PRECISION, L_SUM, TMA,
            )
            state = bk.to(tl.int64) * n_splits_max + split
            tl.store(pm_ptr + state * PART_ROWS + r, m, mask=keep)
            tl.store(pl_ptr + state * PART_ROWS + r, l, mask=keep)
            tl.store(pacc_ptr + (state * PART_ROWS + r[None, :]) * BLOCK_D + ds[:, None], accT, mask=keep[None, :])
        gdc_release(USE_GDC)
    else:
        if ONE_LOOP:
            m, l, accT = _walk_t(
                qT, pos, pos_min, kv_len, n_blocks, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale,
                stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                ROWS, BLOCK_D, PAGE, ATTN_BLK, SPLIT_BLOCKS, PRECISION, L_SUM, TMA,
            )
        else:
            m = tl.full((ROWS,), float("-inf"), tl.float32)
            l = tl.zeros((ROWS,), tl.float32)
            accT = tl.zeros((BLOCK_D, ROWS), tl.float32)
            for blk_lo in range(0, n_blocks, SPLIT_BLOCKS):
                m_s, l_s, acc_s = _split_state_t(
                    qT, pos, pos_min, kv_len, blk_lo, tl.minimum(blk_lo + SPLIT_BLOCKS, n_blocks), k_ptr, v_ptr,
                    bt_row_ptr, kvh, qk_scale, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                    ROWS, BLOCK_D, PAGE, ATTN_BLK, PRECISION, L_SUM, TMA,
                )
                m, l, accT = _merge_t(m, l, accT, m_s, l_s, acc_s)
        gdc_release(USE_GDC)
        _store_t(o_ptr, lse_ptr, m, l, accT, t_idx, head, row_ok, stride_ot, stride_oh, stride_lh, BLOCK_D, STORE_LSE)


@triton.jit
def _pair_rows(bk, n_pairs, cu_ptr, kv_lens_ptr, n_kv_heads, G: tl.constexpr, G_PAD: tl.constexpr,
               ROWS: tl.constexpr, ATTN_BLK: tl.constexpr):
    """Pair bk's sequence, kv head, KV length, blocks (0 past the last pair or for an empty chunk),
    and its rows' positions, tokens, heads and mask."""
    valid = bk < n_pairs
    bk = tl.minimum(bk, n_pairs - 1)
    b = bk // n_kv_heads
    q_lo = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_lo
    kv_len = tl.load(kv_lens_ptr + b)
    n_blocks = tl.where(valid & (q_len > 0), (kv_len - 1) // ATTN_BLK + 1, 0)
    r = tl.arange(0, ROWS)
    tok = r // G_PAD
    head = (bk % n_kv_heads) * G + r % G_PAD
    row_ok = (r % G_PAD < G) & (tok < q_len)
    t_idx = (q_lo + tok).to(tl.int64)
    return b, bk % n_kv_heads, kv_len, n_blocks, kv_len - q_len + tok, t_idx, head, row_ok


@triton.jit
def _store_t(o_ptr, lse_ptr, m, l, accT, t_idx, head, row_ok, stride_ot, stride_oh, stride_lh,
             BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr):
    """A pair's output rows (and their LSE) from its merged state."""
    ds = tl.arange(0, BLOCK_D)
    o = accT / l[None, :]
    tl.store(o_ptr + t_idx[None, :] * stride_ot + head[None, :] * stride_oh + ds[:, None],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + head.to(tl.int64) * stride_lh + t_idx, (m + tl.log2(l)) * LN2, mask=row_ok)


@fast_launch
@triton.jit
def decode_pairs_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, kv_lens_ptr, bt_ptr, qk_scale, n_kv_heads, n_pairs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lh,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    ATTN_BLK: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
    L_SUM: tl.constexpr, TMA: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    """decode_kernel's one-loop walk (no split programs) over pairs 2 p and 2 p + 1 in one loop: each
    pair's blocks, splits and merges as _walk_t walks them (every block through the masked step,
    which keeps a full block's values), so the same bits; the second pair's first loads overlap the
    first pair's last blocks, and half the programs make one wave where one pair a program makes two.
    Both pairs are stored after the loop, and the queries are loaded each block (held in registers
    for both pairs and picked a block, they gave wrong rows and illegal addresses on the H100 from
    256 programs; forty-first run). USE_GDC (PDL, gdc.py): the kernel before waited for first, the
    next released after the walk."""
    gdc_wait(USE_GDC)
    bk = tl.program_id(0) * 2
    bA, hA, kvA, nA, posA, tA, headA, okA = _pair_rows(bk, n_pairs, cu_ptr, kv_lens_ptr, n_kv_heads, G, G_PAD,
                                                       ROWS, ATTN_BLK)
    bB, hB, kvB, nB, posB, tB, headB, okB = _pair_rows(bk + 1, n_pairs, cu_ptr, kv_lens_ptr, n_kv_heads, G, G_PAD,
                                                       ROWS, ATTN_BLK)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    accT = tl.zeros((BLOCK_D, ROWS), tl.float32)
    m_s, l_s, acc_s = m, l, accT
    mA, lA, accA = m, l, accT
    offs = tl.arange(0, ATTN_BLK)
    ds = tl.arange(0, BLOCK_D)
    one = tl.where((tl.arange(0, 64)[:, None] == 0) & (offs[None, :] >= 0), 1.0, 0.0).to(q_ptr.dtype.element_ty)
    for it in range(0, nA + nB):
        second = it >= nA
        j = tl.where(second, it - nA, it)
        n = tl.where(second, nB, nA)
        bt_row_ptr = bt_ptr + tl.where(second, bB, bA).to(tl.int64) * stride_bt
        qT = tl.load(q_ptr + tl.where(second, tB, tA)[None, :] * stride_qt + tl.where(second, headB, headA)[None, :]
                     * stride_qh + ds[:, None], mask=tl.where(second, okB, okA)[None, :], other=0.0)  # a load a block
        m_s, l_s, acc_s = _kv_block_t(qT, m_s, l_s, acc_s, j, tl.where(second, posB, posA),
                                      tl.where(second, kvB, kvA), k_ptr, v_ptr, bt_row_ptr, tl.where(second, hB, hA),
                                      qk_scale, offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs,
                                      stride_vk, PAGE, ATTN_BLK, PRECISION, True, L_SUM, BLOCK_D, TMA)
        if ((j + 1) % SPLIT_BLOCKS == 0) | (j == n - 1):  # a split's end, or the pair's (_walk_t's last merge)
            m, l, accT, m_s, l_s, acc_s = _end_split_t(m, l, accT, m_s, l_s, acc_s)
        if it == nA - 1:  # the first pair's state kept, the second's started as _walk_t starts one
            mA, lA, accA = m, l, accT
            m = tl.full((ROWS,), float("-inf"), tl.float32)
            l = tl.zeros((ROWS,), tl.float32)
            accT = tl.zeros((BLOCK_D, ROWS), tl.float32)
    gdc_release(USE_GDC)
    _store_t(o_ptr, lse_ptr, mA, lA, accA, tA, headA, okA, stride_ot, stride_oh, stride_lh, BLOCK_D, STORE_LSE)
    okB = tl.where(nB > 0, okB, False)  # the second pair absent (past the last): nothing stored
    _store_t(o_ptr, lse_ptr, m, l, accT, tB, headB, okB, stride_ot, stride_oh, stride_lh, BLOCK_D, STORE_LSE)
