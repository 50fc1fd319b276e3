"""The packed training attention's forward as a Gluon kernel for Hopper (sm_90): the bits of
paged_attention's `_attn_kernel` (CONTIG walk), 1.05-1.19x its speed (0.6B / 8B, 4k-16k; tools/bench/gluon_fwd.py).

The engine's prefill / decode and the trainer give the same log-probs only while every path
reduces a row's keys in one order, so this kernel does `_walk`'s operations in `_walk`'s order:
KV blocks of KV_BLOCK keys, an online-softmax step each (the row max over the masked scores,
e = fma(qk, qk_scale, -m), exp2, fixed-point row sums, fma(acc, alpha, +0), then the P V MMA),
splits of KV_SPLIT keys merged with `_merge` where the next split starts, o = acc / l. Rows pack
the GQA group as the Triton tile does (row r: token r // G_PAD, query head kvh * G + r % G_PAD),
one program per (query tile, sequence, kv head), the last tiles first. Only the schedule is
FlashAttention-3's:

    partitions  a 1-warp producer issues the K/V TMA loads into a STAGES-deep shared-memory
                ring (ready / empty mbarriers a slot); two 4-warp consumers own 64 rows each
                of the BLOCK_M = 128 row tile, share every K/V block and run free of each other
    overlap     each consumer issues block j + 1's S = q k^T wgmma with block j's P V wgmma
                and runs block j + 1's softmax while P V is in flight
    q           loaded once by pointers into shared memory

Both consumers walk the tile's KV blocks; rows that reach fewer of them see the rest fully
masked, which changes nothing bitwise (as in the Triton kernel's 128-row tile). Key rows past a
sequence's end in its diagonal block hold the next sequence's K/V (TMA's zeros past T) where the
Triton kernel zeroes them: their scores are masked and their p is exactly 0, so they add +-0
(the same sums unless those rows hold inf / NaN). tests/gpu compare every output and LSE bit
with the Triton kernel's (tools/bench/gluon_fwd.py times it; docs/kernel_tuning.md).

The same kernels take a paged cache (PAGE > 0, paged_attention_fwd: the engine's prefill chunks,
a cached prefix before them): a KV block's TMA row comes from the sequence's block-table entry, the
rows sit at positions kv_len - q_len + t, and a block reaching past kv_len has its stale V rows
zeroed in shared memory before the P V wgmma (the Triton kernel reads them as zeros; K's need
nothing: their scores are masked). On by default on Hopper (paged_attention.GLUON_PAGED), bit-tested
against the paged Triton kernel by tests/gpu/test_attention_gpu.py.

No interpreter runs Gluon: the CPU tests never reach this module's kernels.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_LN2 = gl.constexpr(0.6931471805599453)
# Gluon is experimental: its API moves between Triton releases. The kernels here run with the
# releases tests/gpu ran them on; with any other the callers keep the Triton kernels (same bits).
TESTED_TRITON = ("3.6.",)
BLOCK_M = 128  # rows (token x head) a program: 64 a consumer warpgroup
STAGES = 3  # K/V ring slots (s3 and s4 equal at 0.6B 16k; s4 1-2% faster at 8B 4k; gluon_fwd.py, 2026-12-04)
LOAD_REGS = 24  # registers a thread of the producer warp
CONSUMER_REGS = 240  # and of the consumer warps (168 x 12 warps fill an SM's register file)


def usable(version: str | None = None) -> bool:
    """Whether this Triton (or `version`) is one the Gluon kernels were tested with."""
    return (version or triton.__version__).startswith(TESTED_TRITON)


@gluon.constexpr_function
def _mma_layout(cols, num_warps):
    """wgmma accumulator layout of a [rows, cols] tile: warps stacked over the rows (16 each, rows
    >= 16 * num_warps), one instruction as wide as the tile."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, min(cols, 256), 16])


@gluon.jit
def _slot_barriers(STAGES: gl.constexpr):
    """One mbarrier a ring slot (count 1, initialised): the ring's ready or empty signals."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    return bars


@gluon.jit
def _kv_row(bt_row, j, q_lo, pred, BLOCK_N: gl.constexpr, PAGE: gl.constexpr):
    """The descriptors' row of KV block j's first key: packed K/V (PAGE 0) from the sequence's first
    token q_lo; a paged cache [P * PAGE, K * D] through the sequence's block-table row bt_row (the
    block in one page; the table read only where pred is on)."""
    if PAGE == 0:
        row = q_lo + j * BLOCK_N
    else:
        page = gl.load(bt_row + (j * BLOCK_N) // PAGE, mask=pred, other=0)
        row = page * PAGE + (j * BLOCK_N) % PAGE
    return row


@gluon.jit
def _load_kv_at(k_desc, v_desc, k_smem, v_smem, bar, row, kvh, pred):
    """TMA loads of the k and v tiles of the KV block at `row` (kv head kvh) into one ring slot,
    signalling bar; nothing where pred is off."""
    D: gl.constexpr = k_desc.block_type.shape[1]
    mbarrier.expect(bar, 2 * k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, kvh * D], bar, k_smem, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, kvh * D], bar, v_smem, pred=pred)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bar, j, q_lo, kvh, pred):
    """_load_kv_at of packed K/V's block j of the sequence from token q_lo (the backward's kernels)."""
    _load_kv_at(k_desc, v_desc, k_smem, v_smem, bar, q_lo + j * k_desc.block_type.shape[0], kvh, pred)


@gluon.jit
def _zero_stale_v(v_smem, j, kv_len):
    """Zero the rows of KV block j's v tile at or past kv_len (a paged cache's stale slots may hold
    anything; the Triton kernel reads them as zeros): a masked p of 0 then adds exactly +0."""
    BLOCK_N: gl.constexpr = v_smem.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    rows = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    v = v_smem.load(layout)
    v_smem.store(gl.where((rows < kv_len)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _fixed_sum(p):
    """attn_parts.fixed_sum along axis 1: the row sums in int32 fixed point (any order, one value)."""
    N: gl.constexpr = p.shape[1]
    ONES: gl.constexpr = (N * 0x3F800000 + 2**31) % 2**32 - 2**31
    n = gl.sum((p + 1.0).to(gl.int32, bitcast=True), 1) - ONES
    return n.to(gl.float32) * 1.1920928955078125e-07


@gluon.jit
def _softmax(qk, m, l, j, pos, kv_len, qk_scale, P_DTYPE: gl.constexpr, MASK: gl.constexpr):
    """paged_attention._kv_block's softmax of KV block j's scores qk (keys < kv_len, causal at the
    rows' positions pos): (m, l, p in P_DTYPE, alpha)."""
    BLOCK_N: gl.constexpr = qk.shape[1]
    kv_pos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
    if MASK:
        keep = (kv_pos[None, :] <= pos[:, None]) & (kv_pos < kv_len)[None, :]
        qk_max = gl.max(gl.where(keep, qk, float("-inf")), 1)
    else:
        qk_max = gl.max(qk, 1)
    m_new = gl.maximum(m, qk_max * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    e = gl.fma(qk, gl.full(qk.shape, qk_scale, gl.float32, qk.type.layout), -m_safe[:, None])
    if MASK:
        e = gl.where(keep, e, float("-inf"))
    p = gl.exp2(e)
    alpha = gl.exp2(m - m_safe)
    l = gl.fma(l, alpha, _fixed_sum(p))
    return m_new, l, p.to(P_DTYPE), alpha


@gluon.jit
def _block_softmax(qk, m, l, j, n_full, pos, kv_len, qk_scale, P_DTYPE: gl.constexpr):
    """_softmax with the masks only where block j reaches past a row's position (the same bits)."""
    if j >= n_full:
        m, l, p, alpha = _softmax(qk, m, l, j, pos, kv_len, qk_scale, P_DTYPE, True)
    else:
        m, l, p, alpha = _softmax(qk, m, l, j, pos, kv_len, qk_scale, P_DTYPE, False)
    return m, l, p, alpha


@gluon.jit
def _merge(m, l, acc, m_s, l_s, acc_s):
    """paged_attention._merge: a finished split's state into the total."""
    m_new = gl.maximum(m, m_s)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    a = gl.exp2(m - m_safe)
    b = gl.exp2(m_s - m_safe)
    l = gl.fma(l, a, l_s * b)
    a2 = gl.convert_layout(a, gl.SliceLayout(1, acc.type.layout))
    b2 = gl.convert_layout(b, gl.SliceLayout(1, acc.type.layout))
    acc = gl.fma(acc, gl.broadcast(a2[:, None], acc)[0], acc_s * b2[:, None])
    return m_new, l, acc


@gluon.jit
def _rescale(acc, alpha):
    """fma(acc, alpha, +0), as _kv_block: a split's first block (alpha 0) turns acc into +0."""
    a2 = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))
    return gl.fma(acc, gl.broadcast(a2[:, None], acc)[0], gl.zeros_like(acc))


@gluon.jit
def _load_q(q_ptr, q_smem, q_lo, q_len, t0, kvh, stride_qt, G: gl.constexpr, G_PAD: gl.constexpr):
    """The tile's q rows (token t0 + r // G_PAD, head kvh * G + r % G_PAD; zeros where the row is
    padding) into shared memory, fenced for the wgmmas."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    tok = t0 + r // G_PAD
    ok = (r % G_PAD < G) & (tok < q_len)
    off = (q_lo + tok).to(gl.int64)[:, None] * stride_qt + (kvh * G + r % G_PAD)[:, None] * D + gl.arange(
        0, D, layout=gl.SliceLayout(0, layout))[None, :]
    q_smem.store(gl.load(q_ptr + off, mask=ok[:, None], other=0.0))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _store_out(o_ptr, lse_ptr, m, l, acc, q_lo, q_len, t0, kvh, stride_ot, stride_lh, G: gl.constexpr,
               G_PAD: gl.constexpr, STORE_LSE: gl.constexpr):
    """paged_attention._store_out: o = acc / l rounded once, and the rows' LSE (natural log)."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    D: gl.constexpr = acc.shape[1]
    NW: gl.constexpr = gl.num_warps()
    l2 = gl.convert_layout(l, gl.SliceLayout(1, acc.type.layout))
    o = (acc / l2[:, None]).to(o_ptr.dtype.element_ty)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])  # 16-byte stores
    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    tok = t0 + r // G_PAD
    ok = (r % G_PAD < G) & (tok < q_len)
    head = kvh * G + r % G_PAD
    off = (q_lo + tok).to(gl.int64)[:, None] * stride_ot + head[:, None] * D + gl.arange(
        0, D, layout=gl.SliceLayout(0, layout))[None, :]
    gl.store(o_ptr + off, gl.convert_layout(o, layout), mask=ok[:, None])
    if STORE_LSE:
        _store_lse(lse_ptr, m, l, q_lo, q_len, t0, kvh, stride_lh, G, G_PAD)


@gluon.jit
def _store_lse(lse_ptr, m, l, q_lo, q_len, t0, kvh, stride_lh, G: gl.constexpr, G_PAD: gl.constexpr):
    """Each row's log-sum-exp of its scaled scores, natural log ([H, T]: what the backward takes)."""
    BLOCK_M: gl.constexpr = m.shape[0]
    rl: gl.constexpr = m.type.layout
    r2 = gl.arange(0, BLOCK_M, layout=rl)
    tok2 = t0 + r2 // G_PAD
    ok2 = (r2 % G_PAD < G) & (tok2 < q_len)
    head2 = kvh * G + r2 % G_PAD
    gl.store(lse_ptr + head2.to(gl.int64) * stride_lh + q_lo + tok2, (m + gl.log2(l)) * _LN2, mask=ok2)


@gluon.jit
def _consume(q_ptr, q_smem, k_smem, v_smem, ready, empty, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, q_lo, q_len, t0,
             kvh, n_blocks, kv_len, bt_row, stride_qt, stride_ot, stride_lh, G: gl.constexpr, G_PAD: gl.constexpr,
             SPLIT_BLOCKS: gl.constexpr, STORE_LSE: gl.constexpr, WS: gl.constexpr, PAGE: gl.constexpr):
    """One warpgroup's rows (those of q_smem, tokens from t0; token t at position kv_len - q_len + t,
    the keys before a chunk's first token its cached prefix) over KV blocks 0 .. n_blocks - 1 of
    the ring (k_smem / v_smem, ready barriers), then their output. A block's ring slot is freed
    once every warp has waited its P V wgmma: by an arrive on empty (WS: a producer partition
    refills) or by issuing block j + STAGES's loads there itself. Block j + 1's S wgmma is issued
    with block j's P V and its softmax runs while P V does (FA3's intra-warpgroup overlap).
    Block j's rescale of acc_s runs right after block j - 1's P V (FA3 issues block j + 1's S
    wgmma first: same values, 1-4% slower here; gluon_fwd.py, 2026-12-04)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, NW)  # S: [BLOCK_M, BLOCK_N]
    o_layout: gl.constexpr = _mma_layout(D, NW)  # acc: [BLOCK_M, D]
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    first = kv_len - q_len + t0  # the tile's first position
    pos = first + gl.arange(0, BLOCK_M, layout=row_l) // G_PAD
    n_full = gl.minimum(gl.minimum((first + 1) // BLOCK_N, kv_len // BLOCK_N), n_blocks)  # blocks without masks
    _load_q(q_ptr, q_smem, q_lo, q_len, t0, kvh, stride_qt, G, G_PAD)

    m = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
    l = gl.zeros([BLOCK_M], gl.float32, row_l)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    # block 0: its scores and softmax (m_s -inf: alpha 0, the split's acc_s becomes +0)
    mbarrier.wait(ready.index(0), 0)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    m_s, l_s, p, alpha = _block_softmax(qk, m, l, 0, n_full, pos, kv_len, qk_scale, k_smem.dtype)
    acc_s = _rescale(acc, alpha)
    for j in range(n_blocks - 1):
        # block j's P V and block j + 1's S; block j + 1's softmax while P V runs
        nxt = j + 1
        mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
        p_op = gl.convert_layout(p, op_layout)
        qk = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)
        acc_s = warpgroup_mma(p_op, v_smem.index(j % STAGES), acc_s, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
        m_e, l_e = m_s, l_s
        if nxt % SPLIT_BLOCKS == 0:  # block j ended a split: the next starts empty
            m_s = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
            l_s = gl.zeros([BLOCK_M], gl.float32, row_l)
        m_s, l_s, p, alpha = _block_softmax(qk, m_s, l_s, nxt, n_full, pos, kv_len, qk_scale, k_smem.dtype)
        acc_s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_s, ))
        gl.thread_barrier()  # every warp has waited block j's wgmmas: its slot is free
        if WS:
            mbarrier.arrive(empty.index(j % STAGES))
        else:
            ahead = j + STAGES < n_blocks
            _load_kv_at(k_desc, v_desc, k_smem.index(j % STAGES), v_smem.index(j % STAGES), ready.index(j % STAGES),
                        _kv_row(bt_row, j + STAGES, q_lo, ahead, BLOCK_N, PAGE), kvh, ahead)
        if nxt % SPLIT_BLOCKS == 0:
            m, l, acc = _merge(m, l, acc, m_e, l_e, acc_s)
        acc_s = _rescale(acc_s, alpha)
    last = n_blocks - 1
    if PAGE != 0:  # only the tile's last block can reach past kv_len
        if (last + 1) * BLOCK_N > kv_len:
            _zero_stale_v(v_smem.index(last % STAGES), last, kv_len)
    acc_s = warpgroup_mma(gl.convert_layout(p, op_layout), v_smem.index(last % STAGES), acc_s, is_async=True)
    acc_s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_s, ))
    m, l, acc = _merge(m, l, acc, m_s, l_s, acc_s)
    _store_out(o_ptr, lse_ptr, m, l, acc, q_lo, q_len, t0, kvh, stride_ot, stride_lh, G, G_PAD, STORE_LSE)


@gluon.jit
def _tile(cu_ptr, kv_ptr, bt_ptr, stride_bt, n_kv_heads, TOK: gl.constexpr, BLOCK_N: gl.constexpr,
          PAGE: gl.constexpr):
    """This program's (sequence's first token, its query length, its KV length, its block-table
    row, first token of the tile, kv head, KV blocks the tile meets); the longest (last) q tiles
    start first, as _attn_kernel's grid. Packed (PAGE 0): the KV length is the query length."""
    tile = gl.num_programs(0) - 1 - gl.program_id(0)
    bk = gl.program_id(1)
    b = bk // n_kv_heads
    q_lo = gl.load(cu_ptr + b)
    q_len = gl.load(cu_ptr + b + 1) - q_lo
    if PAGE == 0:
        kv_len = q_len
    else:
        kv_len = gl.load(kv_ptr + b)
    t0 = tile * TOK
    n_blocks = (kv_len - q_len + gl.minimum(t0 + TOK, q_len) - 1) // BLOCK_N + 1
    return q_lo, q_len, kv_len, bt_ptr + b.to(gl.int64) * stride_bt, t0, bk % n_kv_heads, n_blocks


@gluon.jit
def _ring(k_desc, STAGES: gl.constexpr):
    """The K and V ring (STAGES slots of one KV block) and its ready barriers."""
    shape: gl.constexpr = [STAGES, k_desc.block_type.shape[0], k_desc.block_type.shape[1]]
    k_smem = gl.allocate_shared_memory(k_desc.dtype, shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(k_desc.dtype, shape, k_desc.layout)
    return k_smem, v_smem, _slot_barriers(STAGES)


@gluon.jit
def _ws_produce(k_desc, v_desc, k_smem, v_smem, ready, empty, q_lo, kvh, n_blocks, bt_row, PAGE: gl.constexpr):
    """Producer partition (1 warp): KV block b into slot b % STAGES once both consumers freed it."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    for b in range(n_blocks):
        slot = b % STAGES
        # empty barriers start with phase 1 complete: the first round of waits passes at once
        mbarrier.wait(empty.index(slot), ((b // STAGES) & 1) ^ 1)
        _load_kv_at(k_desc, v_desc, k_smem.index(slot), v_smem.index(slot), ready.index(slot),
                    _kv_row(bt_row, b, q_lo, True, BLOCK_N, PAGE), kvh, True)


@gluon.jit
def _fwd_kernel(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, cu_ptr, kv_ptr, bt_ptr, qk_scale, n_kv_heads, stride_qt,
                stride_ot, stride_lh, stride_bt, BLOCK_M: gl.constexpr, G: gl.constexpr, G_PAD: gl.constexpr,
                SPLIT_BLOCKS: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, PAGE: gl.constexpr):
    """One partition of num_warps (4: BLOCK_M 64) that also issues the loads, STAGES blocks ahead
    (measured against the warp-specialized kernel by tools/bench/gluon_fwd.py)."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    q_lo, q_len, kv_len, bt_row, t0, kvh, n_blocks = _tile(cu_ptr, kv_ptr, bt_ptr, stride_bt, n_kv_heads,
                                                           BLOCK_M // G_PAD, BLOCK_N, PAGE)
    if t0 >= q_len:
        return
    q_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_M, D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], k_desc.dtype))
    k_smem, v_smem, ready = _ring(k_desc, STAGES)
    for s in gl.static_range(STAGES):
        _load_kv_at(k_desc, v_desc, k_smem.index(s), v_smem.index(s), ready.index(s),
                    _kv_row(bt_row, s, q_lo, s < n_blocks, BLOCK_N, PAGE), kvh, s < n_blocks)
    _consume(q_ptr, q_smem, k_smem, v_smem, ready, ready, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, q_lo, q_len, t0,
             kvh, n_blocks, kv_len, bt_row, stride_qt, stride_ot, stride_lh, G, G_PAD, SPLIT_BLOCKS, STORE_LSE, False,
             PAGE)


@gluon.jit
def _fwd_ws_kernel(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, cu_ptr, kv_ptr, bt_ptr, qk_scale, n_kv_heads, stride_qt,
                   stride_ot, stride_lh, stride_bt, BLOCK_M: gl.constexpr, G: gl.constexpr, G_PAD: gl.constexpr,
                   SPLIT_BLOCKS: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
                   LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PAGE: gl.constexpr):
    """Warp specialized (module docstring): the default partition and a 4-warp worker consume
    half of the BLOCK_M rows each, a 1-warp worker loads."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    HALF: gl.constexpr = BLOCK_M // 2
    q_lo, q_len, kv_len, bt_row, t0, kvh, n_blocks = _tile(cu_ptr, kv_ptr, bt_ptr, stride_bt, n_kv_heads,
                                                           BLOCK_M // G_PAD, BLOCK_N, PAGE)
    if t0 >= q_len:
        return
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, D], k_desc.dtype)
    q0 = gl.allocate_shared_memory(k_desc.dtype, [HALF, D], q_layout)
    q1 = gl.allocate_shared_memory(k_desc.dtype, [HALF, D], q_layout)
    k_smem, v_smem, ready = _ring(k_desc, STAGES)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=2)  # both consumers
    # a consumer whose rows all lie past the sequence still walks the blocks (its rows unstored)
    t1 = t0 + HALF // G_PAD
    gl.warp_specialize([
        (_consume, (q_ptr, q0, k_smem, v_smem, ready, empty, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, q_lo, q_len, t0,
                    kvh, n_blocks, kv_len, bt_row, stride_qt, stride_ot, stride_lh, G, G_PAD, SPLIT_BLOCKS, STORE_LSE,
                    True, PAGE)),
        (_consume, (q_ptr, q1, k_smem, v_smem, ready, empty, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, q_lo, q_len, t1,
                    kvh, n_blocks, kv_len, bt_row, stride_qt, stride_ot, stride_lh, G, G_PAD, SPLIT_BLOCKS, STORE_LSE,
                    True, PAGE)),
        (_ws_produce, (k_desc, v_desc, k_smem, v_smem, ready, empty, q_lo, kvh, n_blocks, bt_row, PAGE)),
    ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def supported(q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, kv_block: int) -> bool:
    """Whether packed_attention_fwd takes these tensors: CUDA sm_90, bf16 / fp16, head dim 64 or
    128 with contiguous heads, 16-byte aligned rows, a GQA group of at most 64 heads, KV blocks
    of 64 keys (the one size the GPU tests check; the fixed-point row sums take at most 64)."""
    T, H, D = q_THD.shape
    K = k_TKD.shape[1]
    if not (q_THD.is_cuda and torch.cuda.get_device_capability(q_THD.device) == (9, 0)):
        return False
    if q_THD.dtype not in (torch.bfloat16, torch.float16) or D not in (64, 128) or kv_block != 64:
        return False
    if triton.next_power_of_2(H // K) > BLOCK_M // 2 or q_THD.stride(2) != 1 or q_THD.stride(1) != D:
        return False
    return all(t.stride(2) == 1 and t.stride(1) == D and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (k_TKD, v_TKD))


def packed_attention_fwd(q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, cu_seqlens_B1: torch.Tensor,
                         max_len: int, qk_scale: float, lse_HT: torch.Tensor | None, kv_block: int,
                         kv_split: int) -> torch.Tensor:
    """o [T, H, D] of packed causal GQA attention (qk_scale: softmax scale x log2(e)), and each
    row's LSE into lse_HT where given; the caller checked `supported`."""
    T, H, D = q_THD.shape
    K = k_TKD.shape[1]
    o = torch.empty((T, H, D), dtype=q_THD.dtype, device=q_THD.device)
    layout = gl.NVMMASharedLayout.get_default_for([kv_block, D], gl.bfloat16 if q_THD.dtype == torch.bfloat16
                                                  else gl.float16)
    k_desc, v_desc = (TensorDescriptor(x, [T, K * D], [x.stride(0), 1], [kv_block, D], layout)
                      for x in (k_TKD, v_TKD))
    _launch(q_THD, k_desc, v_desc, o, lse_HT, cu_seqlens_B1, cu_seqlens_B1, cu_seqlens_B1, 0, max_len, qk_scale,
            K, kv_split // kv_block, 0)
    return o


def _launch(q_THD, k_desc, v_desc, o, lse_HT, cu, kv_lens, table, stride_bt, max_q_len, qk_scale, K, split_blocks,
            page):
    G = q_THD.shape[1] // K
    g_pad = triton.next_power_of_2(G)
    lse = lse_HT if lse_HT is not None else o  # unused without STORE_LSE
    grid = (triton.cdiv(max_q_len, BLOCK_M // g_pad), (cu.shape[0] - 1) * K)
    _fwd_ws_kernel[grid](q_THD, k_desc, v_desc, o, lse, cu, kv_lens, table, qk_scale, K, q_THD.stride(0), o.stride(0),
                         lse.stride(0), stride_bt, BLOCK_M=BLOCK_M, G=G, G_PAD=g_pad, SPLIT_BLOCKS=split_blocks,
                         STAGES=STAGES, STORE_LSE=lse_HT is not None, LOAD_REGS=LOAD_REGS,
                         CONSUMER_REGS=CONSUMER_REGS, PAGE=page, num_warps=4, maxnreg=168)


def paged_supported(q_THD: torch.Tensor, k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor, kv_block: int) -> bool:
    """Whether paged_attention_fwd takes these: `supported`'s conditions on q and on the caches
    [P, S, K, D] viewed as [P * S, K, D] (pages that flatten), pages of a whole number of KV blocks."""
    P, S, K, D = k_cache_PSKD.shape
    if S % kv_block or v_cache_PSKD.shape != k_cache_PSKD.shape or P * S == 0:
        return False
    if any(c.stride(0) != S * c.stride(1) for c in (k_cache_PSKD, v_cache_PSKD)):
        return False
    return supported(q_THD, k_cache_PSKD.view(P * S, K, D), v_cache_PSKD.view(P * S, K, D), kv_block)


def paged_attention_fwd(q_THD: torch.Tensor, k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor,
                        cu_seqlens_q_B1: torch.Tensor, kv_lens_B: torch.Tensor, block_table_BP: torch.Tensor,
                        max_q_len: int, qk_scale: float, lse_HT: torch.Tensor | None, kv_block: int,
                        kv_split: int) -> torch.Tensor:
    """o [T, H, D] of causal GQA attention of query chunks over a paged K/V cache (the chunk of
    sequence b: queries cu[b] .. cu[b + 1], at positions kv_len - q_len + i; its keys the first
    kv_len of its pages), paged_attention's bits; lse_HT as packed_attention_fwd. The caller checked
    `paged_supported`."""
    T, H, D = q_THD.shape
    P, S, K, _ = k_cache_PSKD.shape
    o = torch.empty((T, H, D), dtype=q_THD.dtype, device=q_THD.device)
    if T == 0 or cu_seqlens_q_B1.shape[0] < 2:
        return o
    layout = gl.NVMMASharedLayout.get_default_for([kv_block, D], gl.bfloat16 if q_THD.dtype == torch.bfloat16
                                                  else gl.float16)
    k_desc, v_desc = (TensorDescriptor(c, [P * S, K * D], [c.stride(1), 1], [kv_block, D], layout)
                      for c in (k_cache_PSKD, v_cache_PSKD))
    table = block_table_BP.to(torch.int32).contiguous()
    _launch(q_THD, k_desc, v_desc, o, lse_HT, cu_seqlens_q_B1.to(torch.int32).contiguous(),
            kv_lens_B.to(torch.int32).contiguous(), table, table.stride(0), max(int(max_q_len), 1), qk_scale, K,
            kv_split // kv_block, S)
    return o
