"""The packed causal GQA attention backward's dK / dV and dQ as Gluon kernels for Hopper (sm_90):
attention_bwd's `_dkdv_kernel` and `_dq_kernel` (same math, masks and MMA order: the same values),
FlashAttention-3's schedule. dK / dV 1.13-1.23x the Triton kernel, dQ 1.14-1.27x
(tools/bench/gluon_dkdv.py, gluon_dq.py, 2026-12-04 twenty-second run).

Both kernels run the forward's partitions (gluon_attention._fwd_ws_kernel): a 1-warp producer
issues the TMA loads into a STAGES-deep shared-memory ring (ready / empty mbarriers a slot), two
4-warp consumers own half of the program's tile each, share every ring tile and run free of each
other.

dK / dV: one program per (2 x BLOCK_N keys, sequence, kv head), looping over its G query heads and
the query blocks at or after its keys as one flat loop of steps; dV = P^T dout,
dK = scale * dS^T q, with P recomputed from the LSE in log2 units and dS = P * (dout v^T - delta):

    K, V       one TMA load each into shared memory, BLOCK_N keys a consumer, resident
    q, dout    a step's tiles of BLOCK_M rows through the ring (it prefetches across heads); a
               consumer skips the steps whose query block ends before its keys
    LSE, delta each step's loaded a step ahead, one a thread (waiting on them at the step's exp2
               made a first version 0.66x the Triton kernel)
    MMAs       wgmma, async: S^T = k q^T and dP^T = v dout^T together, then dV += P^T dout and
               dK += dS^T q with P^T / dS^T from registers; fp32 dK, dV in registers

dQ: one program per (2 x DQ_BLOCK_M query rows, sequence, query head), the last rows first, each
consumer's rows resident (q, dout) and the KV blocks up to the diagonal through the ring: S and dP
wgmmas together, then dQ += dS k. A row's dQ sums its KV blocks in order, as the Triton kernel's
at any query tile.

No interpreter runs Gluon: the CPU tests never reach this module's kernels.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from miles_kernels._triton.gluon_attention import (CONSUMER_REGS, LOAD_REGS, _load_kv, _mma_layout,
                                                   _slot_barriers)

_LOG2E = gl.constexpr(1.4426950408889634)
# dK/dV: query rows a step (attention_bwd's full-GPU tile: the same values), keys a consumer (two a
# program), q / dout ring slots. s2 and s4 within 0.5% of each other at 0.6B 4k / 16k / packed,
# s3 3-9% slower (spills); tools/bench/gluon_dkdv.py, 2026-12-04 twenty-second run.
BLOCK_M, BLOCK_N, STAGES = 64, 64, 2
# dQ: query rows a consumer (two a program), K / V ring slots (s4 1.7% faster than s2 at 16k,
# within 0.7% at 4k / packed; tools/bench/gluon_dq.py, same run). Its KV blocks: BLOCK_N keys.
DQ_BLOCK_M, DQ_STAGES = 64, 4


@gluon.jit
def _program(cu_ptr, n_kv_heads, n_bk, BLOCK_N: gl.constexpr):
    """As attention_bwd._program: (KV block's first key, kv head, sequence's first token, its length)
    of this program; the grid runs rank-major over (KV block, sequence, kv head)."""
    pid = gl.program_id(0)
    b = (pid % n_bk) // n_kv_heads
    q_lo = gl.load(cu_ptr + b)
    return (pid // n_bk) * BLOCK_N, pid % n_kv_heads, q_lo, gl.load(cu_ptr + b + 1) - q_lo


@gluon.jit
def _load_q_do(q_desc, do_desc, q_smem, do_smem, bar, t, i_lo, n_i, q_lo, kvh, pred, G: gl.constexpr):
    """TMA loads of step t's q and dout tiles (query head kvh * G + t // n_i, query block
    i_lo + t % n_i) into one ring slot, signalling bar; nothing where pred is off."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    row = q_lo + (i_lo + t % n_i) * BLOCK_M
    col = (kvh * G + t // n_i) * D
    mbarrier.expect(bar, 2 * q_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_smem, pred=pred)
    tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_smem, pred=pred)


@gluon.jit
def _rows(lse_ptr, delta_ptr, t, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh, pred, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, G: gl.constexpr):
    """Step t's query rows' LSE (log2 units) and delta (_rows_at of its block and head)."""
    return _rows_at(lse_ptr, delta_ptr, i_lo + t % n_i, kvh * G + t // n_i, q_lo, q_len, stride_lh, stride_dh, pred,
                    BLOCK_M)


@gluon.jit
def _rows_at(lse_ptr, delta_ptr, i, h, q_lo, q_len, stride_lh, stride_dh, pred, BLOCK_M: gl.constexpr):
    """Query block i's rows' LSE (log2 units) and delta in head h, loaded ahead of the step that
    uses them (pred off: zeros): a load issued a step early is not waited on at the step's exp2.
    Held one a thread (the MMA layout's slice would take 32 registers), moved into _step's layout
    there."""
    NW: gl.constexpr = gl.num_warps()
    qpos = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    ok = (qpos < q_len) & pred
    h = h.to(gl.int64)
    lse = gl.load(lse_ptr + h * stride_lh + q_lo + qpos, mask=ok, other=0.0)
    delta = gl.load(delta_ptr + h * stride_dh + q_lo + qpos, mask=ok, other=0.0)
    return lse * _LOG2E, delta


@gluon.jit
def _step(dk, dv, k_smem, v_smem, q_s, do_s, lse2, delta, t, i_lo, n_i, i_full, n_q_full, kpos, q_len, qk_scale):
    """Add step t's query block (rows in q_s / do_s; their LSE in log2 units and delta from _rows)
    to dk, dv (as attention_bwd._dkdv_step). Its four wgmmas: S^T and dP^T issued together, dV's
    issued before dS^T is made, all waited here."""
    dv, dsT = _dv_ds(dv, k_smem, v_smem, q_s, do_s, lse2, delta, i_lo + t % n_i, i_full, n_q_full, kpos, q_len,
                     qk_scale)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    dk = warpgroup_mma(gl.convert_layout(dsT.to(q_s.dtype), op_layout), q_s, dk, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))


@gluon.jit
def _dv_ds(dv, k_smem, v_smem, q_s, do_s, lse2, delta, i, i_full, n_q_full, kpos, q_len, qk_scale):
    """Query block i's part of a dK / dV step: S^T and dP^T wgmmas issued together, P^T, dV's wgmma
    issued (dv returned in flight), dS^T (fp32, [BLOCK_N, BLOCK_M])."""
    BLOCK_M: gl.constexpr = q_s.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _mma_layout(BLOCK_M, NW)  # S^T, dP^T: [BLOCK_N, BLOCK_M]
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv.type.layout, k_width=2)
    qpos = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    sT = warpgroup_mma(k_smem, q_s.permute((1, 0)), zero, use_acc=False, is_async=True)
    dpT = warpgroup_mma(v_smem, do_s.permute((1, 0)), zero, use_acc=False, is_async=True)
    sT = warpgroup_mma_wait(num_outstanding=1, deps=(sT, ))
    pT = gl.exp2(sT * qk_scale - gl.convert_layout(lse2, gl.SliceLayout(0, s_layout))[None, :])
    if (i < i_full) | (i >= n_q_full):  # the diagonal or the sequence's last, partial block
        pT = gl.where((kpos[:, None] <= qpos[None, :]) & (qpos < q_len)[None, :], pT, 0.0)
    dv = warpgroup_mma(gl.convert_layout(pT.to(q_s.dtype), op_layout), do_s, dv, is_async=True)
    dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
    return dv, pT * (dpT - gl.convert_layout(delta, gl.SliceLayout(0, s_layout))[None, :])


@gluon.jit
def _store_rows(acc, ptr, r0, q_lo, q_len, head, scale, stride_t):
    """Rows r0 .. r0 + R of one head's grad (acc [R, D] times scale) into ptr [T, heads, D], the
    rows inside the sequence."""
    R: gl.constexpr = acc.type.shape[0]
    D: gl.constexpr = acc.type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])  # 16-byte stores
    rows = r0 + gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    off = (q_lo + rows).to(gl.int64)[:, None] * stride_t + head * D + gl.arange(0, D, layout=gl.SliceLayout(0, layout))[
        None, :]
    gl.store(ptr + off, gl.convert_layout((acc * scale).to(ptr.dtype.element_ty), layout), mask=rows[:, None] < q_len)


@gluon.jit
def _store_dkdv(dk, dv, dk_ptr, dv_ptr, n0, q_lo, q_len, kvh, scale, stride_kt):
    """Rows n0 .. n0 + BLOCK_N of the kv head's dK (times scale) and dV, the rows inside the sequence."""
    _store_rows(dk, dk_ptr, n0, q_lo, q_len, kvh, scale, stride_kt)
    _store_rows(dv, dv_ptr, n0, q_lo, q_len, kvh, 1.0, stride_kt)


@gluon.jit
def _start(kv_bar, lse_ptr, delta_ptr, n0, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, D: gl.constexpr, G: gl.constexpr):
    """_begin, then step 0's LSE and delta."""
    i_full, n_q_full, kpos, dk, dv = _begin(kv_bar, n0, q_len, BLOCK_M, BLOCK_N, D)
    lse2, delta = _rows(lse_ptr, delta_ptr, 0, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh, True, BLOCK_M,
                        BLOCK_N, G)
    return i_full, n_q_full, kpos, dk, dv, lse2, delta


@gluon.jit
def _begin(kv_bar, n0, q_len, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr):
    """The start of a dK / dV loop over keys n0 .. n0 + BLOCK_N: (the first query block that sees
    every key whole, the count of blocks that end inside the sequence, the keys' positions, zeroed
    dK and dV), once K and V have landed (kv_bar)."""
    NW: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = _mma_layout(D, NW)  # dK, dV: [BLOCK_N, D]
    kpos = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, _mma_layout(BLOCK_M, NW)))
    dk = gl.zeros([BLOCK_N, D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    return gl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), q_len // BLOCK_M, kpos, dk, dv


@gluon.jit
def _alloc_pair(a_desc, b_desc, ring_a_desc, ring_b_desc, STAGES: gl.constexpr):
    """Shared memory of a program: two resident tiles of a and of b (one pair a consumer), a
    STAGES-slot ring of the other two, its ready barriers and its empty ones (count 2: both
    consumers), and the resident tiles' barrier."""
    a0 = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b0 = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    a1 = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b1 = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    ring_shape: gl.constexpr = [STAGES, ring_a_desc.block_type.shape[0], ring_a_desc.block_type.shape[1]]
    ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, ring_shape, ring_a_desc.layout)
    ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, ring_shape, ring_b_desc.layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=2)
    return a0, b0, a1, b1, ring_a, ring_b, _slot_barriers(STAGES), empty, _slot_barriers(1).index(0)


@gluon.jit
def _load_pair(a_desc, b_desc, a0, b0, a1, b1, bar, row, col):
    """The two consumers' resident tiles, one barrier: a and b from row (a0, b0) and from the next
    tile's rows (a1, b1), at column col."""
    HALF: gl.constexpr = a_desc.block_type.shape[0]
    mbarrier.expect(bar, 4 * a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row, col], bar, a0)
    tma.async_copy_global_to_shared(b_desc, [row, col], bar, b0)
    tma.async_copy_global_to_shared(a_desc, [row + HALF, col], bar, a1)
    tma.async_copy_global_to_shared(b_desc, [row + HALF, col], bar, b1)


@gluon.jit
def _ring_q_do(q_desc, do_desc, q_smem, do_smem, ready, empty, i_lo, n_i, q_lo, kvh, G: gl.constexpr):
    """The producer's loop: step t's q, dout into slot t % STAGES once the consumers freed it."""
    STAGES: gl.constexpr = q_smem.type.shape[0]
    for t in range(G * n_i):
        slot = t % STAGES
        # empty barriers start with phase 1 complete: the first round of waits passes at once
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
        _load_q_do(q_desc, do_desc, q_smem.index(slot), do_smem.index(slot), ready.index(slot), t, i_lo, n_i, q_lo,
                   kvh, True, G)


@gluon.jit
def _dkdv_load(q_desc, do_desc, k_desc, v_desc, k0, v0, k1, v1, q_smem, do_smem, ready, empty, kv_bar, n0, kvh, q_lo,
               i_lo, n_i, G: gl.constexpr):
    """Producer (1 warp) of _dkdv_kernel: both halves' K, V once, then each step's q, dout
    into the ring as both consumers free a slot."""
    _load_pair(k_desc, v_desc, k0, v0, k1, v1, kv_bar, q_lo + n0, kvh * k_desc.block_type.shape[1])
    _ring_q_do(q_desc, do_desc, q_smem, do_smem, ready, empty, i_lo, n_i, q_lo, kvh, G)


@gluon.jit
def _dkdv_consume(k_smem, v_smem, q_smem, do_smem, ready, empty, kv_bar, dk_ptr, dv_ptr, lse_ptr, delta_ptr, n0, kvh,
                  q_lo, q_len, i_lo, n_i, qk_scale, scale, stride_kt, stride_lh, stride_dh, G: gl.constexpr):
    """A consumer (num_warps warps): its BLOCK_N keys from n0 (k_smem, v_smem) over every step of
    the program, computing those whose query block reaches its keys (all but, in _dkdv_kernel,
    the second consumer's first), each ring slot released once its wgmmas are done; then dK, dV."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    D: gl.constexpr = q_smem.type.shape[2]
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    STAGES: gl.constexpr = q_smem.type.shape[0]
    first = gl.where(n0 < q_len, n0 // BLOCK_M, i_lo + n_i)  # keys all past the sequence: no block
    i_full, n_q_full, kpos, dk, dv, lse2, delta = _start(kv_bar, lse_ptr, delta_ptr, n0, i_lo, n_i, q_lo, q_len, kvh,
                                                         stride_lh, stride_dh, BLOCK_M, BLOCK_N, D, G)
    for t in range(G * n_i):
        lse2_n, delta_n = _rows(lse_ptr, delta_ptr, t + 1, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh,
                                t + 1 < G * n_i, BLOCK_M, BLOCK_N, G)
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        if i_lo + t % n_i >= first:
            dk, dv = _step(dk, dv, k_smem, v_smem, q_smem.index(slot), do_smem.index(slot), lse2, delta, t, i_lo, n_i,
                           i_full, n_q_full, kpos, q_len, qk_scale)
        gl.thread_barrier()  # every warp is past its wgmma wait before the one arrive
        mbarrier.arrive(empty.index(slot))
        lse2, delta = lse2_n, delta_n
    _store_dkdv(dk, dv, dk_ptr, dv_ptr, n0, q_lo, q_len, kvh, scale, stride_kt)


@gluon.jit
def _dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale,
                 n_kv_heads, n_bk, stride_kt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr,
                 LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """One program a (2 x BLOCK_N keys, sequence, kv head): a 1-warp producer, two 4-warp consumers
    of BLOCK_N keys each (k / v descriptors of BLOCK_N rows) sharing every q / dout tile, free of
    each other."""
    HALF: gl.constexpr = k_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    n0, kvh, q_lo, q_len = _program(cu_ptr, n_kv_heads, n_bk, 2 * HALF)
    if n0 >= q_len:
        return
    k0, v0, k1, v1, q_smem, do_smem, ready, empty, kv_bar = _alloc_pair(k_desc, v_desc, q_desc, do_desc, STAGES)
    i_lo = n0 // BLOCK_M
    n_i = gl.cdiv(q_len, BLOCK_M) - i_lo
    gl.warp_specialize([
        (_dkdv_consume, (k0, v0, q_smem, do_smem, ready, empty, kv_bar, dk_ptr, dv_ptr, lse_ptr, delta_ptr, n0, kvh,
                         q_lo, q_len, i_lo, n_i, qk_scale, scale, stride_kt, stride_lh, stride_dh, G)),
        (_dkdv_consume, (k1, v1, q_smem, do_smem, ready, empty, kv_bar, dk_ptr, dv_ptr, lse_ptr, delta_ptr, n0 + HALF,
                         kvh, q_lo, q_len, i_lo, n_i, qk_scale, scale, stride_kt, stride_lh, stride_dh, G)),
        (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, k0, v0, k1, v1, q_smem, do_smem, ready, empty, kv_bar, n0, kvh,
                      q_lo, i_lo, n_i, G)),
    ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


@gluon.jit
def _dq_step(dq, q_smem, do_smem, k_s, v_s, lse2, delta, qpos, j, n_full, qk_scale):
    """Add KV block j (keys in k_s / v_s) to dq (as attention_bwd._dq_step). Its three wgmmas:
    S and dP issued together, dQ's after dS is made, all waited here."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_s.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, NW)  # S, dP: [BLOCK_M, BLOCK_N]
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq.type.layout, k_width=2)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_s.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_smem, v_s.permute((1, 0)), zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    p = gl.exp2(s * qk_scale - lse2[:, None])
    if j >= n_full:  # the diagonal's blocks: keys past the sequence's end sit past every real row
        kpos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        p = gl.where(kpos[None, :] <= qpos[:, None], p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
    ds = p * (dp - delta[:, None])
    dq = warpgroup_mma(gl.convert_layout(ds.to(k_s.dtype), op_layout), k_s, dq, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))


@gluon.jit
def _dq_rows(lse_ptr, delta_ptr, h, q_lo, q_len, m0, stride_lh, stride_dh, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr):
    """The query block's row positions (S's row layout), its LSE in log2 units and delta (0 past
    the sequence), the count of KV blocks wholly before its first row (no mask) and of KV blocks
    it meets."""
    NW: gl.constexpr = gl.num_warps()
    qpos = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, _mma_layout(BLOCK_N, NW)))
    ok = qpos < q_len
    lse2 = gl.load(lse_ptr + h.to(gl.int64) * stride_lh + q_lo + qpos, mask=ok, other=0.0) * _LOG2E
    delta = gl.load(delta_ptr + h.to(gl.int64) * stride_dh + q_lo + qpos, mask=ok, other=0.0)
    n_full = (m0 + 1) // BLOCK_N
    n_kv = gl.cdiv(gl.minimum(m0 + BLOCK_M, q_len), BLOCK_N)
    return qpos, lse2, delta, n_full, n_kv


@gluon.jit
def _dq_load(q_desc, do_desc, k_desc, v_desc, q0, do0, q1, do1, k_smem, v_smem, ready, empty, q_bar, m0, h, q_lo,
             n_kv, G: gl.constexpr):
    """Producer (1 warp) of _dq_kernel: both halves' q, dout once, then the KV blocks both
    consumers walk into the ring as both free a slot."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _load_pair(q_desc, do_desc, q0, do0, q1, do1, q_bar, q_lo + m0, h * q_desc.block_type.shape[1])
    for j in range(n_kv):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # phase 1 starts complete
        _load_kv(k_desc, v_desc, k_smem.index(slot), v_smem.index(slot), ready.index(slot), j, q_lo, h // G, True)


@gluon.jit
def _dq_consume(q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, dq_ptr, lse_ptr, delta_ptr, m0, h, q_lo,
                q_len, n_kv_all, qk_scale, scale, stride_qt, stride_lh, stride_dh):
    """A consumer (num_warps warps): its BLOCK_M rows from m0 over the KV blocks they meet, each
    ring slot released once its wgmmas are done, then the ring's blocks up to n_kv_all that only
    another consumer needs (_dq_kernel)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    qpos, lse2, delta, n_full, n_kv = _dq_rows(lse_ptr, delta_ptr, h, q_lo, q_len, m0, stride_lh, stride_dh,
                                               BLOCK_M, BLOCK_N)
    n_kv = gl.where(m0 < q_len, n_kv, 0)  # rows all past the sequence: nothing to compute
    dq = gl.zeros([BLOCK_M, D], gl.float32, _mma_layout(D, NW))
    mbarrier.wait(q_bar, 0)
    for j in range(n_kv):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        dq = _dq_step(dq, q_smem, do_smem, k_smem.index(slot), v_smem.index(slot), lse2, delta, qpos, j, n_full,
                      qk_scale)
        gl.thread_barrier()  # every warp is past its wgmma wait before the one arrive
        mbarrier.arrive(empty.index(slot))
    for j in range(n_kv, n_kv_all):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        mbarrier.arrive(empty.index(slot))
    _store_rows(dq, dq_ptr, m0, q_lo, q_len, h, scale, stride_qt)


@gluon.jit
def _dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale, n_heads, n_bh,
               n_blocks, stride_qt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr,
               LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """One program a (2 x DQ_BLOCK_M query rows, sequence, query head), the last rows first: a
    1-warp producer, two 4-warp consumers of DQ_BLOCK_M rows each (q / dout descriptors of that
    many rows) sharing every K/V block, free of each other."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    # grid rank-major over (rank, sequence, query head) as attention_bwd._dq_kernel; rank r is
    # the row block n_blocks - 1 - r: the last (most KV blocks) start first
    r0, h, q_lo, q_len = _program(cu_ptr, n_heads, n_bh, 2 * HALF)
    m0 = (n_blocks - 1) * 2 * HALF - r0
    if m0 >= q_len:
        return
    q0, do0, q1, do1, k_smem, v_smem, ready, empty, q_bar = _alloc_pair(q_desc, do_desc, k_desc, v_desc, STAGES)
    n_kv = gl.cdiv(gl.minimum(m0 + 2 * HALF, q_len), BLOCK_N)
    gl.warp_specialize([
        (_dq_consume, (q0, do0, k_smem, v_smem, ready, empty, q_bar, dq_ptr, lse_ptr, delta_ptr, m0, h, q_lo, q_len,
                       n_kv, qk_scale, scale, stride_qt, stride_lh, stride_dh)),
        (_dq_consume, (q1, do1, k_smem, v_smem, ready, empty, q_bar, dq_ptr, lse_ptr, delta_ptr, m0 + HALF, h, q_lo,
                       q_len, n_kv, qk_scale, scale, stride_qt, stride_lh, stride_dh)),
        (_dq_load, (q_desc, do_desc, k_desc, v_desc, q0, do0, q1, do1, k_smem, v_smem, ready, empty, q_bar, m0, h,
                    q_lo, n_kv, G)),
    ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def _desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor of contiguous x [T, n, D] as [T, n * D] in blocks of rows x D."""
    x2 = x.view(x.shape[0], -1)
    D = x.shape[2]
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(x2, list(x2.shape), [x2.stride(0), 1], [rows, D], layout)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> bool:
    """Whether dkdv takes these contiguous tensors: CUDA sm_90, bf16 / fp16, head dim 64 or 128,
    16-byte aligned."""
    D = q.shape[2]
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.bfloat16, torch.float16) and D in (64, 128)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v, do)))


def dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
         lse_HT: torch.Tensor, delta_HT: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float) -> None:
    """dk, dv (contiguous [T, K, D], written) of contiguous q, dout [T, H, D] and k, v [T, K, D];
    the caller checked `supported`."""
    T, H, D = q.shape
    K = k.shape[1]
    B = cu.shape[0] - 1
    grid = (triton.cdiv(max_len, 2 * BLOCK_N) * B * K, )
    _dkdv_kernel[grid](_desc(q, BLOCK_M), _desc(do, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), dk, dv, lse_HT,
                       delta_HT, cu, scale * 1.4426950408889634, scale, K, B * K, K * D, lse_HT.stride(0),
                       delta_HT.stride(0), G=H // K, STAGES=STAGES, LOAD_REGS=LOAD_REGS, CONSUMER_REGS=CONSUMER_REGS,
                       num_warps=4, maxnreg=168)


def dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dq_out: torch.Tensor, lse_HT: torch.Tensor,
       delta_HT: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float) -> None:
    """dq_out (contiguous [T, H, D], written) of contiguous q, dout [T, H, D] and k, v [T, K, D];
    the caller checked `supported`."""
    T, H, D = q.shape
    K = k.shape[1]
    B = cu.shape[0] - 1
    n_blocks = triton.cdiv(max_len, 2 * DQ_BLOCK_M)
    _dq_kernel[(n_blocks * B * H, )](_desc(q, DQ_BLOCK_M), _desc(do, DQ_BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N),
                                     dq_out, lse_HT, delta_HT, cu, scale * 1.4426950408889634, scale, H, B * H,
                                     n_blocks, H * D, lse_HT.stride(0), delta_HT.stride(0), G=H // K,
                                     STAGES=DQ_STAGES, LOAD_REGS=LOAD_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
                                     maxnreg=168)
