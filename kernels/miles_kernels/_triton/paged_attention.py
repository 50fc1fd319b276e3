"""Paged causal GQA attention, one reduction order for prefill, chunked prefill and decode.

A query row (one token x one query head) reduces its keys in a fixed order:

    KV positions 0 .. pos, in blocks of KV_BLOCK tokens (online softmax, fp32; a multiple of
    ATTN_BLOCK, whatever the page size: a block wider than a page gathers each token's page),
    blocks grouped in splits of KV_SPLIT tokens, each split started from an empty state,
    splits merged left to right with _merge, then acc / l.

Prefill (any q_len) runs it in one program per (q tile, sequence, kv head), walking all the
splits in one loop (WALK: each split's state merged into the total where the split ends).
When every sequence fits one q tile (decode, short verify chunks) and the
(sequence, kv head) pairs are too few to fill the GPU, the splits run in parallel programs
that write their states, and _combine_kernel merges them in the same order with the same
code, so decode == prefill bitwise while keeping the GPU busy.
The M tile packs the GQA group: row r is token r // G_PAD, query head kvh * G + r % G_PAD.
Blocks past a row's position only add fully masked scores, which change nothing bitwise.
A block's row sums (ROW_SUM "fixed" by default) are order-free, so decode may also run in
decode_attention's swapped tile (DECODE_TILE) with the same bits.
"""


import torch
import triton
import triton.language as tl

from miles_kernels._triton.attn_parts import LN2, exact_sum, fixed_sum, kv_tma, seq_and_head, tma_descriptors
from miles_kernels._triton.decode_attention import decode_kernel, decode_pairs_kernel
from miles_kernels._triton.gluon_gate import gluon_module
from miles_kernels._triton import launch
from miles_kernels._triton.launch import fast_launch

from miles_kernels._cpu import ATTN_BLOCK  # KV walk granularity: one constant for CPU and CUDA

KV_BLOCK = 64  # KV tokens per online-softmax step (multiple of ATTN_BLOCK); any page size works (gather)
KV_SPLIT = 256  # tokens per split (multiple of KV_BLOCK): enough programs for decode, few merges
# Split-parallel decode launches about this many programs ((sequence, kv head) pairs x split
# programs): enough to fill an H200 several times over. From 512 pairs on (batch 64 at 8 kv
# heads) the one-program path is faster (59.8 vs 63.4 us at B 64 ctx 544, 314.6 vs 319.5 at
# ctx 4096; 2026-12-02 attn_sweep.py --decode) and drops the combine kernel.
DECODE_PROGRAMS = 512
_BLOCK_M = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 16}  # rows (token x head) per decode tile
_DECODE_LAUNCH = {torch.bfloat16: (4, 3), torch.float16: (4, 3), torch.float32: (4, 3)}  # its num_warps, num_stages
# (BLOCK_M, num_warps, num_stages) of the fused path: the tall tile where the longest query
# chunk fills one and the grid still has PREFILL_FILL programs, else the short one (decode at
# a large batch, short prompts); a row's reduction is the same in all.
_PREFILL_TILES = {torch.bfloat16: ((128, 8, 3), (64, 4, 3)), torch.float16: ((128, 8, 3), (64, 4, 3)),
                  torch.float32: ((16, 4, 3), (16, 4, 3))}
# The same for packed K/V read by TMA (KV_TMA): 64 rows and one warpgroup beat 128 rows there
# (attn_sweep.py --tma --tiles, 2026-12-03 fifteenth run: 0.6B / 8B 16k 1.21 / 1.20x flash vs
# 1.12 / 1.11x; with pointer loads the same tile is 1.01 / 0.98x).
_PREFILL_TILES_TMA = {torch.bfloat16: ((64, 4, 3),), torch.float16: ((64, 4, 3),), torch.float32: ((16, 4, 3),)}
PREFILL_FILL = 128  # programs (about one per SM on an H100/H200) the tall tile must still make
# A block's row sums l: "reduce" (a register reduction, in an order set by the tile's layout),
# "dot" (an MMA of the rounded p against a one-hot column: one order whichever operand p is),
# "exact" (attn_parts.exact_sum: the same value in any order) or "fixed" (attn_parts.fixed_sum:
# int32 fixed point, also order-free, fewer operations). "fixed" lets decode use the swapped tile
# at the cost of 2-5% of the training forward (attn_sweep.py --rowsum, 2026-12-03, thirteenth run).
ROW_SUM = "fixed"
ROW_SUMS = ("reduce", "dot", "exact", "fixed")
# Short chunks (decode, verify) in the 64-row tile ("rows"), in decode_attention's swapped tile
# ("swapped": the KV block as the MMA's M; needs a shared ROW_SUM, not "reduce", for prefill's
# bits), or "auto": swapped from SWAPPED_MIN_PAIRS (sequence, kv head) pairs on under a shared
# ROW_SUM, else rows (the two tiles give the same bits then, so the choice is speed only).
# Measured (same run): swapped 5-12% faster from 512 pairs (B 64, 256), equal at 64 (B 8).
DECODE_TILE = "auto"
SWAPPED_MIN_PAIRS = 64
# Its (num_warps, num_stages): None is the rule, one warpgroup (wgmma) and 3 stages where one
# program walks a pair's splits in one loop at fewer than SWAPPED_DEEP_PAIRS pairs, else 2
# (attn_sweep.py --swapped-launch, 2026-12-03 fifteenth run: B 64 ctx 1024 / 4096 83.4 / 275.7 us
# at 3 stages vs 92.4 / 316.1 at 2; from B 128 2 stages best; 8 warps 1.5-1.9x slower). A third
# entry caps the registers a thread (maxnreg: more programs an SM; the same bits): no gain on the
# H200 (thirty-ninth run: 168 level at B 64 ctx 192, 8-15% slower at 544-4,096; 128 slower).
_SWAPPED_LAUNCH = None
SWAPPED_DEEP_PAIRS = 1024
# A program that runs all of its tile's splits (prefill; decode from DECODE_PROGRAMS pairs on)
# walks them in one loop ("one": one software pipeline across them) or a loop per split
# ("splits"): the same operations in the same order, so the same bits. "auto": "one" except in
# the swapped decode tile below WALK_SWAPPED_MIN_PAIRS (sequence, kv head) pairs. Measured
# (attn_sweep.py --walk, 2026-12-03): training forward 1.06-1.22x flash at 4k / 16k with "one"
# (0.90-1.12x with "splits"); decode in the swapped tile at 2048 pairs (B 256) 7-11% faster with
# "one"; at 512 (B 64) 8-10% slower at 2 stages, 2-4% faster at 3 (--swapped-launch, fifteenth
# run); the 64-row tile 2-5% faster with "one" at both.
WALK = "auto"
WALKS = ("one", "splits", "auto")
WALK_SWAPPED_MIN_PAIRS = 512
# (sequence, kv head) pairs a swapped-tile decode program walks in one loop (1 or 2), at
# DECODE_PAIRS_MIN <= pairs < DECODE_PAIRS_MAX where a program walks all of a pair's splits in one
# loop (decode_attention.decode_pairs_kernel: each pair's walk unchanged, the same bits), at 2
# stages: half the programs, so B 64 at 8 kv heads makes one wave of two programs an SM, and the
# second pair's loads overlap the first pair's last blocks. H100 (forty-first run, attn_sweep.py
# --pairs, 0.6B heads, graph-timed): B 64 ctx 128 / 192 / 384 / 544 / 1,024 23.2 / 30.4 / 50.6 /
# 65.3 / 104.8 us against one pair a program's 25.4 / 33.0 / 52.0 / 67.2 / 106.5 (1.02-1.09x; SDPA
# 24.0 / 31.9 / 49.6 / 65.0 / 103.9), ctx 4,096 368.0 vs 362.1; B 128 level; B 256 ctx 192 86.2 vs 84.3.
DECODE_PAIRS = 2
DECODE_PAIRS_MIN = 512
DECODE_PAIRS_MAX = 1024
_LOG2E = 1.4426950408889634
# K/V read by TMA tensor descriptors instead of pointers (same values, same bits; D a power of
# two, 16-byte aligned rows; on CUDA 16-bit dtypes): packed K/V (training: measured 2-4% faster,
# and the 64-row tile it allows 1.20-1.35x flash, attn_sweep.py --tma, 2026-12-03 fifteenth run)
# and paged caches (the engine, the block inside one page), per walk: prefill 4-9% faster with
# TMA and its tile; decode 9-12% slower at B 64 (ctx 1024 / 4096: 91.7 / 312.8 vs 84.0 / 278.5
# us), 1-2% faster from B 128 (attn_sweep.py --tma-paged, 2026-12-03 sixteenth run).
KV_TMA = True
PAGED_KV_TMA = {"prefill": True, "decode": False}
# The packed training forward by gluon_attention's kernel on Hopper where it takes the tensors
# (FA3's producer warp, two consumer warpgroups and overlapped wgmmas, the same bits): 1.05-1.19x
# this module's kernel at 0.6B / 8B 4k-16k (tools/bench/gluon_fwd.py, 2026-12-04 twenty-first run).
GLUON_FWD = True
# The engine's prefill (chunks over a paged cache, cached prefixes included) by the same Gluon kernel
# on Hopper (gluon_attention.paged_attention_fwd: block-table rows for the TMA loads, positions from
# kv_len - q_len, a boundary block's stale V rows zeroed in shared memory): the paged Triton kernel's
# bits (tests/gpu/test_attention_gpu.py::test_gluon_paged_prefill_bitwise). H200, thirty-sixth run
# (kernel_ops.py): 8B L=16384 page 64 4.49 ms against the paged Triton kernel's 5.70, SDPA's default
# (cuDNN) 3.54.
GLUON_PAGED = True


@triton.jit
def _merge(m, l, acc, m_s, l_s, acc_s):
    m_new = tl.maximum(m, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m - m_safe)
    b = tl.exp2(m_s - m_safe)
    # explicit fma: the compiler cannot contract this differently in the two kernels
    l = tl.fma(l, a, l_s * b)
    acc = tl.fma(acc, tl.broadcast_to(a[:, None], acc.shape), acc_s * b[:, None])
    return m_new, l, acc


@triton.jit
def _kv_load(j, kv_pos, ok, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, D, offs, ds,
             stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
             PAGE: tl.constexpr, ATTN_BLK: tl.constexpr, CONTIG: tl.constexpr, MASK: tl.constexpr):
    """K^T [BLOCK_D, ATTN_BLK] and V [ATTN_BLK, BLOCK_D] of KV block j by pointers (zeros
    past kv_len and past D)."""
    if CONTIG:  # packed K/V [T, K, D]: the sequence's tokens from kv_base on
        k_off = (kv_base + kv_pos) * stride_ks
        v_off = (kv_base + kv_pos) * stride_vs
    elif PAGE % ATTN_BLK == 0:  # the block lies in one page
        page = tl.load(bt_row_ptr + (j * ATTN_BLK) // PAGE).to(tl.int64)
        slot = (j * ATTN_BLK) % PAGE + offs
        k_off = page * stride_kp + slot * stride_ks
        v_off = page * stride_vp + slot * stride_vs
    else:  # the block spans pages: gather each token's page (same values, same bits)
        page = tl.load(bt_row_ptr + kv_pos // PAGE, mask=ok, other=0).to(tl.int64)
        slot = kv_pos % PAGE
        k_off = page * stride_kp + slot * stride_ks
        v_off = page * stride_vp + slot * stride_vs
    if MASK:
        kT = tl.load(k_ptr + kvh * stride_kk + k_off[None, :] + ds[:, None],
                     mask=ok[None, :] & (ds[:, None] < D), other=0.0)
        v = tl.load(v_ptr + kvh * stride_vk + v_off[:, None] + ds[None, :],
                    mask=ok[:, None] & (ds[None, :] < D), other=0.0)
    else:
        kT = tl.load(k_ptr + kvh * stride_kk + k_off[None, :] + ds[:, None], mask=ds[:, None] < D, other=0.0)
        v = tl.load(v_ptr + kvh * stride_vk + v_off[:, None] + ds[None, :], mask=ds[None, :] < D, other=0.0)
    return kT, v


@triton.jit
def _kv_block(
    q, m, l, acc, j, pos, kv_len, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D, offs, ds, one,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    PAGE: tl.constexpr, ATTN_BLK: tl.constexpr, PRECISION: tl.constexpr, CONTIG: tl.constexpr,
    MASK: tl.constexpr, L_SUM: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):
    """One online-softmax step over KV block j. MASK=False only where every position of the
    block is visible to every row (the causal and length masks would keep every score)."""
    kv_pos = j * ATTN_BLK + offs
    ok = kv_pos < kv_len
    if TMA:  # k_ptr/v_ptr: descriptors of K/V as [rows, K * D] (D == BLOCK_D)
        kT, v = kv_tma(j, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, ok, PAGE, ATTN_BLK, CONTIG, MASK, BLOCK_D)
        kT = tl.trans(kT)
    else:
        kT, v = _kv_load(j, kv_pos, ok, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, D, offs, ds,
                         stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, PAGE, ATTN_BLK, CONTIG, MASK)
    qk = tl.dot(q, kT, input_precision=PRECISION)
    if MASK:
        keep = (kv_pos[None, :] <= pos[:, None]) & ok[None, :]
        qk_max = tl.max(tl.where(keep, qk, float("-inf")), 1)
    else:
        qk_max = tl.max(qk, 1)
    # max(qk * scale) == max(qk) * scale as rounding is monotone (qk_scale > 0, checked by the
    # callers): one multiply a row instead of one a score, the same bits
    m_new = tl.maximum(m, qk_max * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    # an explicit fma: left to itself the compiler contracts qk * scale - m where no mask sits
    # between them and not where one does, and the two paths would round differently
    e = tl.fma(qk, qk_scale, -m_safe[:, None])
    if MASK:
        e = tl.where(keep, e, float("-inf"))
    p = tl.exp2(e)
    alpha = tl.exp2(m - m_safe)
    pv = p.to(v.dtype)
    if L_SUM == "dot":  # column 0 of p @ one-hot: the other columns add exact zeros
        ps = tl.sum(tl.dot(pv, one, input_precision=PRECISION), 1)
    elif L_SUM == "exact":
        ps = exact_sum(p, 1)
    elif L_SUM == "fixed":
        ps = fixed_sum(p, 1)
    else:
        ps = tl.sum(p, 1)
    l = tl.fma(l, alpha, ps)
    # fma(acc, alpha, +0), not acc * alpha: the same value, but a split's first block (alpha 0,
    # m = -inf) turns any finite acc into +0, as an empty one: _end_split need not zero acc
    acc = tl.dot(pv, v, tl.fma(acc, tl.broadcast_to(alpha[:, None], acc.shape), 0.0), input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _split_state(
    q, pos, pos_min, kv_len, kv_base, blk_lo, blk_hi, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr,
    PRECISION: tl.constexpr, CONTIG: tl.constexpr, L_SUM: tl.constexpr, TMA: tl.constexpr,
):
    """Online softmax over KV blocks [blk_lo, blk_hi) from an empty state; scores in log2 units.
    Blocks every row sees whole (ending at or before the tile's first position pos_min, and
    inside kv_len) skip the masks: masking would keep every score, so the bits are the same."""
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    offs = tl.arange(0, ATTN_BLK)
    ds = tl.arange(0, BLOCK_D)
    one = tl.where((offs[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0), 1.0, 0.0).to(q.dtype)
    n_full = tl.minimum((pos_min + 1) // ATTN_BLK, kv_len // ATTN_BLK)
    full_hi = tl.maximum(tl.minimum(blk_hi, n_full), blk_lo)
    for j in range(blk_lo, full_hi):
        m, l, acc = _kv_block(q, m, l, acc, j, pos, kv_len, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D,
                              offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                              PAGE, ATTN_BLK, PRECISION, CONTIG, False, L_SUM, BLOCK_D, TMA)
    for j in range(full_hi, blk_hi):
        m, l, acc = _kv_block(q, m, l, acc, j, pos, kv_len, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D,
                              offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                              PAGE, ATTN_BLK, PRECISION, CONTIG, True, L_SUM, BLOCK_D, TMA)
    return m, l, acc


@triton.jit
def _end_split(m, l, acc, m_s, l_s, acc_s):
    """Merge a finished split's state into the total; the next split starts empty: m_s -inf and
    l_s 0 here, acc_s by the next block's rescale (_kv_block: alpha 0, fma(acc_s, 0, +0) = +0)."""
    m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
    return m, l, acc, tl.full(m_s.shape, float("-inf"), tl.float32), tl.zeros(l_s.shape, tl.float32), acc_s


@triton.jit
def _walk(
    q, pos, pos_min, kv_len, kv_base, n_blocks, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, ATTN_BLK: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr, PRECISION: tl.constexpr, CONTIG: tl.constexpr, L_SUM: tl.constexpr,
    TMA: tl.constexpr,
):
    """Every split of blocks [0, n_blocks) in one loop, so one software pipeline runs across
    the splits: each split's state starts empty and is merged into the total at the split's
    end, the operations and order of _split_state per split then _merge (the same bits). The
    merge runs at the top of the next split's first step, not after the split's last block:
    reading the split's accumulator right after its wgmma made ptxas serialize every wgmma of
    the kernel (C7514; zeroing it there, C7515)."""
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_s, l_s, acc_s = m, l, acc
    offs = tl.arange(0, ATTN_BLK)
    ds = tl.arange(0, BLOCK_D)
    one = tl.where((offs[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0), 1.0, 0.0).to(q.dtype)
    full_hi = tl.minimum(tl.minimum((pos_min + 1) // ATTN_BLK, kv_len // ATTN_BLK), n_blocks)
    for j in range(0, full_hi):
        if (j % SPLIT_BLOCKS == 0) & (j > 0):  # block j - 1 ended a split
            m, l, acc, m_s, l_s, acc_s = _end_split(m, l, acc, m_s, l_s, acc_s)
        m_s, l_s, acc_s = _kv_block(q, m_s, l_s, acc_s, j, pos, kv_len, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh,
                                    qk_scale, D, offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs,
                                    stride_vk, PAGE, ATTN_BLK, PRECISION, CONTIG, False, L_SUM, BLOCK_D, TMA)
    for j in range(full_hi, n_blocks):
        if (j % SPLIT_BLOCKS == 0) & (j > 0):  # block j - 1 ended a split
            m, l, acc, m_s, l_s, acc_s = _end_split(m, l, acc, m_s, l_s, acc_s)
        m_s, l_s, acc_s = _kv_block(q, m_s, l_s, acc_s, j, pos, kv_len, kv_base, k_ptr, v_ptr, bt_row_ptr, kvh,
                                    qk_scale, D, offs, ds, one, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs,
                                    stride_vk, PAGE, ATTN_BLK, PRECISION, CONTIG, True, L_SUM, BLOCK_D, TMA)
    m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)  # the last split (none: merging an empty state adds nothing)
    return m, l, acc


@triton.jit
def _store_out(o_ptr, lse_ptr, m, l, acc, t_idx, head, ds, row_ok, D, stride_ot, stride_oh, stride_lh,
               STORE_LSE: tl.constexpr):
    """o = acc / l, rounded once; with STORE_LSE also each row's log-sum-exp of its scaled
    scores in natural-log units ([H, T], what flash's backward takes): m and l are in log2 units."""
    o = acc / l[:, None]
    tl.store(
        o_ptr + t_idx[:, None] * stride_ot + head[:, None] * stride_oh + ds[None, :],
        o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (ds[None, :] < D),
    )
    if STORE_LSE:
        tl.store(lse_ptr + head.to(tl.int64) * stride_lh + t_idx, (m + tl.log2(l)) * LN2, mask=row_ok)


@fast_launch
@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, cu_ptr, kv_lens_ptr, bt_ptr,
    qk_scale, D, n_kv_heads, n_splits_max,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lh,
    stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, ATTN_BLK: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, SPLIT_PARALLEL: tl.constexpr,
    PART_ROWS: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr, CONTIG: tl.constexpr,
    L_SUM: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr,
):
    TOK: tl.constexpr = BLOCK_M // G_PAD
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) q tiles start first
    bk = tl.program_id(1)
    b = bk // n_kv_heads
    kvh = bk % n_kv_heads
    q_lo = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_lo
    if CONTIG:  # packed whole sequences: K/V rows are the queries' own
        kv_len = q_len
    else:
        kv_len = tl.load(kv_lens_ptr + b)
    kv_base = q_lo.to(tl.int64)
    t0 = tile * TOK
    if t0 >= q_len:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // G_PAD
    head = kvh * G + rows % G_PAD
    row_ok = (rows % G_PAD < G) & (tok < q_len)
    pos = kv_len - q_len + tok
    pos_min = kv_len - q_len + t0
    n_blocks = (kv_len - q_len + tl.minimum(t0 + TOK, q_len) - 1) // ATTN_BLK + 1
    ds = tl.arange(0, BLOCK_D)
    t_idx = (q_lo + tok).to(tl.int64)
    q = tl.load(
        q_ptr + t_idx[:, None] * stride_qt + head[:, None] * stride_qh + ds[None, :],
        mask=row_ok[:, None] & (ds[None, :] < D), other=0.0,
    )
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
    if SPLIT_PARALLEL:
        # Program p of the P on axis 2 computes splits p, p + P, ...: the grid does not grow with
        # the block table's width (a 40k-token max_model_len), only with the GPU's appetite.
        keep = rows < PART_ROWS  # only the first PART_ROWS rows (max_q_len x G_PAD) can be real
        for split in range(tl.program_id(2), tl.cdiv(n_blocks, SPLIT_BLOCKS), tl.num_programs(2)):
            blk_lo = split * SPLIT_BLOCKS
            m, l, acc = _split_state(
                q, pos, pos_min, kv_len, kv_base, blk_lo, tl.minimum(blk_lo + SPLIT_BLOCKS, n_blocks), k_ptr, v_ptr,
                bt_row_ptr, kvh, qk_scale, D, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                BLOCK_M, BLOCK_D, PAGE, ATTN_BLK, PRECISION, CONTIG, L_SUM, TMA,
            )
            state = bk.to(tl.int64) * n_splits_max + split
            tl.store(pm_ptr + state * PART_ROWS + rows, m, mask=keep)
            tl.store(pl_ptr + state * PART_ROWS + rows, l, mask=keep)
            tl.store(pacc_ptr + (state * PART_ROWS + rows[:, None]) * BLOCK_D + ds[None, :], acc, mask=keep[:, None])
    elif ONE_LOOP:
        m, l, acc = _walk(
            q, pos, pos_min, kv_len, kv_base, n_blocks, k_ptr, v_ptr, bt_row_ptr, kvh, qk_scale, D,
            stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
            BLOCK_M, BLOCK_D, PAGE, ATTN_BLK, SPLIT_BLOCKS, PRECISION, CONTIG, L_SUM, TMA,
        )
        _store_out(o_ptr, lse_ptr, m, l, acc, t_idx, head, ds, row_ok, D, stride_ot, stride_oh, stride_lh, STORE_LSE)
    else:
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for blk_lo in range(0, n_blocks, SPLIT_BLOCKS):
            m_s, l_s, acc_s = _split_state(
                q, pos, pos_min, kv_len, kv_base, blk_lo, tl.minimum(blk_lo + SPLIT_BLOCKS, n_blocks), k_ptr, v_ptr,
                bt_row_ptr, kvh, qk_scale, D, stride_kp, stride_ks, stride_kk, stride_vp, stride_vs, stride_vk,
                BLOCK_M, BLOCK_D, PAGE, ATTN_BLK, PRECISION, CONTIG, L_SUM, TMA,
            )
            m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
        _store_out(o_ptr, lse_ptr, m, l, acc, t_idx, head, ds, row_ok, D, stride_ot, stride_oh, stride_lh, STORE_LSE)


@fast_launch
@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, cu_ptr, kv_lens_ptr, D, n_kv_heads, n_splits_max, stride_ot, stride_oh,
    stride_lh, G: tl.constexpr, G_PAD: tl.constexpr, PART_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ATTN_BLK: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    # The merge is per row, so a PART_ROWS tile gives each row what the fused path gives it.
    bk, b, kvh, q_lo, q_len, kv_len = seq_and_head(cu_ptr, kv_lens_ptr, n_kv_heads)
    if q_len <= 0:
        return
    n_blocks = (kv_len - 1) // ATTN_BLK + 1  # one q tile holds the whole chunk: last row is at kv_len - 1
    rows = tl.arange(0, PART_ROWS)
    ds = tl.arange(0, BLOCK_D)
    m = tl.full((PART_ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((PART_ROWS,), tl.float32)
    acc = tl.zeros((PART_ROWS, BLOCK_D), tl.float32)
    for split in range(0, tl.cdiv(n_blocks, SPLIT_BLOCKS)):
        state = bk.to(tl.int64) * n_splits_max + split
        m_s = tl.load(pm_ptr + state * PART_ROWS + rows)
        l_s = tl.load(pl_ptr + state * PART_ROWS + rows)
        acc_s = tl.load(pacc_ptr + (state * PART_ROWS + rows[:, None]) * BLOCK_D + ds[None, :])
        m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
    tok = rows // G_PAD
    head = kvh * G + rows % G_PAD
    row_ok = (rows % G_PAD < G) & (tok < q_len)
    t_idx = (q_lo + tok).to(tl.int64)
    _store_out(o_ptr, lse_ptr, m, l, acc, t_idx, head, ds, row_ok, D, stride_ot, stride_oh, stride_lh, STORE_LSE)


def attention(
    q_THD: torch.Tensor, k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor, cu_seqlens_q_B1: torch.Tensor,
    kv_lens_B: torch.Tensor, block_table_BP: torch.Tensor, max_q_len: int, scale: float,
    lse_HT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention over a paged KV cache (K/V of the new tokens already written).
    lse_HT: an fp32 [H, T] tensor to fill with each row's log-sum-exp of its scaled scores
    (natural log, flash's layout: the training backward reuses it); the output's bits are
    the same with or without it."""
    T, H, D = q_THD.shape
    P, S, K, Dk = k_cache_PSKD.shape
    B = kv_lens_B.shape[0]
    if Dk != D or v_cache_PSKD.shape != k_cache_PSKD.shape:
        raise ValueError(f"miles_kernels attention: q head dim {D}, k cache {list(k_cache_PSKD.shape)}, "
                         f"v cache {list(v_cache_PSKD.shape)}: caches must be [P, S, K, D] with q's D")
    if S % ATTN_BLOCK or KV_BLOCK % ATTN_BLOCK or KV_SPLIT % KV_BLOCK:
        raise ValueError(f"miles_kernels attention: page size {S} must be a multiple of ATTN_BLOCK={ATTN_BLOCK} "
                         f"(and KV_SPLIT={KV_SPLIT} of KV_BLOCK={KV_BLOCK}, KV_BLOCK of ATTN_BLOCK)")
    if cu_seqlens_q_B1.shape != (B + 1,) or block_table_BP.dim() != 2 or block_table_BP.shape[0] != B:
        raise ValueError(f"miles_kernels attention: with B={B} kv_lens, cu_seqlens_q must be [B+1] "
                         f"(got {list(cu_seqlens_q_B1.shape)}) and block_table [B, pages] (got {list(block_table_BP.shape)})")
    _check(q_THD, k_cache_PSKD, v_cache_PSKD, K, lse_HT)
    bt = block_table_BP.to(torch.int32).contiguous()
    n_splits = triton.cdiv(bt.shape[1] * S, KV_SPLIT)  # host-known upper bound: no sync, graph-safe
    walk = "decode" if _short(max_q_len, q_THD.dtype, H // K) else "prefill"
    if walk == "prefill" and GLUON_PAGED and ROW_SUM == "fixed" and q_THD.is_cuda and T and B:
        ga = gluon_module("gluon_attention")
        if ga is not None and ga.paged_supported(q_THD, k_cache_PSKD, v_cache_PSKD, KV_BLOCK):
            _check_scale(scale)
            return ga.paged_attention_fwd(q_THD, k_cache_PSKD, v_cache_PSKD, cu_seqlens_q_B1, kv_lens_B, bt,
                                          max(int(max_q_len), 1), scale * _LOG2E, lse_HT, KV_BLOCK, KV_SPLIT)
    return _launch(q_THD, k_cache_PSKD, v_cache_PSKD, cu_seqlens_q_B1, kv_lens_B.to(torch.int32).contiguous(), bt,
                   max_q_len, scale, lse_HT, S, n_splits, (k_cache_PSKD.stride(0), v_cache_PSKD.stride(0)),
                   _kv_descriptors(k_cache_PSKD, v_cache_PSKD, PAGED_KV_TMA[walk] and S % KV_BLOCK == 0))


def packed_attention(
    q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, cu_seqlens_B1: torch.Tensor, max_len: int,
    scale: float, lse_HT: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attention` of whole packed sequences (training: each sequence's queries are all its
    tokens) read straight from the packed K/V [T, K, D]: no cache, no pages. The same walk
    as the paged kernel (on Hopper gluon_attention's kernel, GLUON_FWD), so the same bits as
    writing K/V to any paged cache and calling `attention` (tests/gpu checks it); lse_HT as there."""
    T, H, D = q_THD.shape
    Tk, K, Dk = k_TKD.shape
    if Dk != D or Tk != T or v_TKD.shape != k_TKD.shape:
        raise ValueError(f"miles_kernels packed_attention: q {list(q_THD.shape)}, k {list(k_TKD.shape)}, "
                         f"v {list(v_TKD.shape)}: k and v must be [T, K, D] with q's T and D")
    _check(q_THD, k_TKD, v_TKD, K, lse_HT)
    cu = cu_seqlens_B1.to(torch.int32).contiguous()
    gluon = GLUON_FWD and ROW_SUM == "fixed" and q_THD.is_cuda and T and cu.shape[0] > 1
    ga = gluon_module("gluon_attention") if gluon else None
    if ga is not None and ga.supported(q_THD, k_TKD, v_TKD, KV_BLOCK):
        _check_scale(scale)
        return ga.packed_attention_fwd(q_THD, k_TKD, v_TKD, cu, max(int(max_len), 1), scale * _LOG2E, lse_HT, KV_BLOCK,
                                       KV_SPLIT)
    # K/V as one "page" per token row: strides (token, head); PAGE/table unused (CONTIG)
    return _launch(q_THD, k_TKD[None], v_TKD[None], cu, cu, cu[:, None], max_len, scale, lse_HT, KV_BLOCK, 1,
                   (0, 0), _kv_descriptors(k_TKD, v_TKD, KV_TMA))


def _check_scale(scale: float) -> None:
    if not 0.0 < scale < float("inf"):  # the kernels take each row's max before scaling
        raise ValueError(f"miles_kernels attention: scale {scale} must be a positive finite number "
                         f"(softmax(scale * q k^T), usually head_dim ** -0.5)")


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, enabled: bool) -> tuple | None:
    """TMA descriptors of K/V (packed [T, K, D] or a paged cache [P, S, K, D]) in blocks of
    KV_BLOCK rows, or None: the pointer walk then (the same bits)."""
    return tma_descriptors((k, v), KV_BLOCK, enabled)


def _check(q_THD, k, v, K: int, lse_HT) -> None:
    T, H, D = q_THD.shape
    if H % K:
        raise ValueError(f"miles_kernels attention: {H} query heads is not a multiple of {K} kv heads")
    if q_THD.dtype not in _BLOCK_M or k.dtype != q_THD.dtype or v.dtype != q_THD.dtype:
        raise TypeError(f"miles_kernels attention: q {q_THD.dtype} and k/v {k.dtype}/{v.dtype} "
                        "must share one dtype of bf16, fp16, fp32")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("miles_kernels attention: K/V must have a contiguous last (head-dim) axis")
    if lse_HT is not None and (lse_HT.shape != (H, T) or lse_HT.dtype != torch.float32 or lse_HT.stride(1) != 1):
        raise ValueError(f"miles_kernels attention: lse_HT must be fp32 [H={H}, T={T}] with unit stride over T, "
                         f"got {lse_HT.dtype} {list(lse_HT.shape)}")


def _short(max_q_len: int, dtype: torch.dtype, G: int) -> bool:
    """Whether chunks of max_q_len queries (G query heads a kv head) take a decode tile: all
    of a chunk's rows fit one program's rows (decode, verify)."""
    g_pad = triton.next_power_of_2(G)
    return max(int(max_q_len), 1) <= max(_BLOCK_M[dtype], g_pad) // g_pad


def _swapped_tile(pairs: int) -> bool:
    """Whether short chunks run in the swapped tile (DECODE_TILE, ROW_SUM: see above)."""
    if ROW_SUM not in ROW_SUMS:
        raise ValueError(f"miles_kernels attention: ROW_SUM {ROW_SUM!r} is not one of {ROW_SUMS}")
    if DECODE_TILE == "rows":
        return False
    if DECODE_TILE == "auto":
        return ROW_SUM != "reduce" and pairs >= SWAPPED_MIN_PAIRS
    if DECODE_TILE != "swapped":
        raise ValueError(f"miles_kernels attention: DECODE_TILE {DECODE_TILE!r} is not 'rows', 'swapped' or 'auto'")
    if ROW_SUM == "reduce":
        raise ValueError("miles_kernels attention: DECODE_TILE 'swapped' needs ROW_SUM 'dot', 'exact' or 'fixed' "
                         "(got 'reduce'): with 'reduce' its row sums would not be the prefill's bits")
    return True


def _one_loop(swapped: bool, pairs: int) -> bool:
    """Whether a program that runs all of its splits walks them in one loop (WALK: see above)."""
    if WALK not in WALKS:
        raise ValueError(f"miles_kernels attention: WALK {WALK!r} is not one of {WALKS}")
    return WALK == "one" or (WALK == "auto" and (not swapped or pairs >= WALK_SWAPPED_MIN_PAIRS))


def _decode_pairs(pairs: int) -> int:
    """(sequence, kv head) pairs a one-loop swapped decode program walks (DECODE_PAIRS: see above)."""
    if DECODE_PAIRS not in (1, 2):
        raise ValueError(f"miles_kernels attention: DECODE_PAIRS {DECODE_PAIRS!r}: want 1 or 2 pairs a decode program")
    return DECODE_PAIRS if DECODE_PAIRS_MIN <= pairs < DECODE_PAIRS_MAX else 1


def _swapped_launch(pairs: int, one_loop: bool) -> dict:
    """The swapped decode tile's launch options (num_warps, num_stages, maybe maxnreg):
    _SWAPPED_LAUNCH, or its rule."""
    if _SWAPPED_LAUNCH is not None:
        return dict(zip(("num_warps", "num_stages", "maxnreg"), _SWAPPED_LAUNCH))
    return dict(num_warps=4, num_stages=3 if one_loop and pairs < SWAPPED_DEEP_PAIRS else 2)


def _launch(q_THD, k4, v4, cu_seqlens, kv_lens, bt, max_q_len: int, scale: float, lse_HT, page: int,
            n_splits: int, page_strides: tuple[int, int], kv_descs: tuple | None = None) -> torch.Tensor:
    """Launch the kernel on k4/v4 = paged caches [P, S, K, D] (page_strides: their page
    strides), or packed K/V [1, T, K, D] (page_strides (0, 0): the CONTIG walk; kv_descs:
    their TMA descriptors, read instead of the pointers)."""
    contig = page_strides == (0, 0)
    _check_scale(scale)
    T, H, D = q_THD.shape
    K = k4.shape[2]
    B = cu_seqlens.shape[0] - 1
    if q_THD.stride(-1) != 1:
        q_THD = q_THD.contiguous()
    o_THD = torch.empty((T, H, D), dtype=q_THD.dtype, device=q_THD.device)
    if T == 0 or B == 0:
        return o_THD
    G = H // K
    g_pad = triton.next_power_of_2(G)
    block_m = max(_BLOCK_M[q_THD.dtype], g_pad)
    block_d = triton.next_power_of_2(D)
    cu = cu_seqlens.to(torch.int32).contiguous()
    max_q_len = max(int(max_q_len), 1)
    # Split-parallel decode only pays while (sequence, kv head) pairs alone leave the GPU idle;
    # the one-program path merges the same split states in the same order (same bits).
    split_programs = min(n_splits, triton.cdiv(DECODE_PROGRAMS, B * K))
    short = not contig and _short(max_q_len, q_THD.dtype, G)  # decode, verify chunks: the decode tile
    split_parallel = short and split_programs > 1
    num_warps, num_stages = _DECODE_LAUNCH[q_THD.dtype]
    if not short:
        for bm, num_warps, num_stages in (_PREFILL_TILES if kv_descs is None else _PREFILL_TILES_TMA)[q_THD.dtype]:
            block_m = max(bm, g_pad)
            tok = block_m // g_pad  # a tall tile of a few real rows (decode at a large batch) is waste
            if max_q_len >= tok and triton.cdiv(max_q_len, tok) * B * K >= PREFILL_FILL:
                break
    tok_per_tile = block_m // g_pad
    part_rows = triton.next_power_of_2(max_q_len * g_pad) if split_parallel else 1
    n_splits = n_splits if split_parallel else 1
    dev = q_THD.device
    pm = torch.empty((B * K, n_splits, part_rows), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty((B * K, n_splits, part_rows, block_d) if split_parallel else (1,), dtype=torch.float32, device=dev)
    consts = dict(G=G, G_PAD=g_pad, BLOCK_D=block_d, ATTN_BLK=KV_BLOCK, SPLIT_BLOCKS=KV_SPLIT // KV_BLOCK)
    lse = lse_HT if lse_HT is not None else pm
    kv = kv_descs if kv_descs is not None else (k4, v4)
    if short and D == block_d >= 16 and _swapped_tile(B * K):
        one_loop = _one_loop(True, B * K)
        opts = _swapped_launch(B * K, one_loop and not split_parallel)
        if one_loop and not split_parallel and _decode_pairs(B * K) == 2:
            opts = opts if _SWAPPED_LAUNCH is not None else dict(num_warps=4, num_stages=2)
            decode_pairs_kernel[(triton.cdiv(B * K, 2),)](
                q_THD, *kv, o_THD, lse, cu, kv_lens, bt, scale * _LOG2E, K, B * K,
                q_THD.stride(0), q_THD.stride(1), o_THD.stride(0), o_THD.stride(1), lse.stride(0),
                page_strides[0], k4.stride(1), k4.stride(2), page_strides[1], v4.stride(1), v4.stride(2), bt.stride(0),
                G=G, G_PAD=g_pad, ROWS=max(16, triton.next_power_of_2(max_q_len * g_pad)), BLOCK_D=block_d, PAGE=page,
                ATTN_BLK=KV_BLOCK, SPLIT_BLOCKS=KV_SPLIT // KV_BLOCK,
                PRECISION="ieee" if q_THD.dtype == torch.float32 else "tf32", STORE_LSE=lse_HT is not None,
                L_SUM=ROW_SUM, TMA=kv_descs is not None, USE_GDC=launch.gdc_rows(q_THD, B), **opts,
            )
            return o_THD
        decode_kernel[(B * K, split_programs if split_parallel else 1)](
            q_THD, *kv, o_THD, lse, pm, pl, pacc, cu, kv_lens, bt, scale * _LOG2E, K, n_splits,
            q_THD.stride(0), q_THD.stride(1), o_THD.stride(0), o_THD.stride(1), lse.stride(0),
            page_strides[0], k4.stride(1), k4.stride(2), page_strides[1], v4.stride(1), v4.stride(2), bt.stride(0),
            G=G, G_PAD=g_pad, ROWS=max(16, triton.next_power_of_2(max_q_len * g_pad)), BLOCK_D=block_d, PAGE=page,
            ATTN_BLK=KV_BLOCK, SPLIT_BLOCKS=KV_SPLIT // KV_BLOCK, SPLIT_PARALLEL=split_parallel, PART_ROWS=part_rows,
            PRECISION="ieee" if q_THD.dtype == torch.float32 else "tf32", STORE_LSE=lse_HT is not None,
            L_SUM=ROW_SUM, ONE_LOOP=one_loop, TMA=kv_descs is not None, USE_GDC=launch.gdc_rows(q_THD, B), **opts,
        )
    else:
        _attn_kernel[(triton.cdiv(max_q_len, tok_per_tile), B * K, split_programs if split_parallel else 1)](
            q_THD, *kv, o_THD, lse, pm, pl, pacc, cu, kv_lens, bt,
            scale * _LOG2E, D, K, n_splits,
            q_THD.stride(0), q_THD.stride(1), o_THD.stride(0), o_THD.stride(1), lse.stride(0),
            page_strides[0], k4.stride(1), k4.stride(2), page_strides[1], v4.stride(1), v4.stride(2), bt.stride(0),
            BLOCK_M=block_m, PAGE=page, SPLIT_PARALLEL=split_parallel, PART_ROWS=part_rows,
            PRECISION="ieee" if q_THD.dtype == torch.float32 else "tf32", STORE_LSE=lse_HT is not None,
            CONTIG=contig, TMA=kv_descs is not None,
            L_SUM=ROW_SUM, ONE_LOOP=_one_loop(False, B * K), **consts, num_warps=num_warps, num_stages=num_stages,
        )
    if split_parallel:
        _combine_kernel[(B * K,)](
            o_THD, lse, pm, pl, pacc, cu, kv_lens, D, K, n_splits, o_THD.stride(0), o_THD.stride(1), lse.stride(0),
            PART_ROWS=part_rows, STORE_LSE=lse_HT is not None, **consts, num_warps=4,
        )
    return o_THD
