"""The attention backward's dK, dV and dQ in one Gluon kernel for Hopper (sm_90): attention_bwd's
DQ_FUSED kernel (`_dkdvq_kernel` at FUSED_TILES' tile: 64 query rows a step, 128 keys a program)
with its values, five MMAs a step where the split kernels run seven (FlashAttention-3's backward).

One program a (128 keys, sequence, kv head); its steps run as `_dkdvq_kernel`'s do: the query
blocks from the sequence's last down to the diagonal, the G query heads inner. Partitions:

    producer   1 warp: both halves' K, V once, then each step's q, dout through a STAGES-slot ring
    consumers  2 x 4 warps, 64 keys each: S^T, dP^T, dV, dK as gluon_attention_bwd's dK / dV
               consumer; dS^T (bf16) to shared memory, and once both halves are there each makes
               64 of dQ's D columns: dS k over the 128 keys (two chained wgmmas, a half of the
               keys each: one K-order, as the Triton kernel's dot), into its writer's fp32 tile
    writers    1 warp a consumer: its tile into the query block's fp32 sum in KV-block order,
               `_dq_turn`'s operations: KV block 0 stores, each later one waits for its turn and
               adds with atomics, the diagonal's (the last) adds the sum to its own part, scales
               and writes dq; with DIAGONAL_IN_CONSUMER the consumers do that last part of the
               program's last 2G steps themselves (_diagonal). A turn is a counter a (query head,
               query block) each writer lane adds 1 to (release) after its own adds; KV block j
               waits for 2 x 32 j. A program waits only for lower KV blocks of its sequence and
               head, which the rank-major grid starts before it: no deadlock.

Both consumers compute every step (the Triton tile's 128 keys see every step; a half whose keys
all lie past a query block adds +-0, as there). Key and query rows past a sequence's end hold the
next sequence's K/V / q / dout (TMA's zeros past T) where the Triton kernel zeroes them: their
p and dS are exactly 0, so they add +-0 (the same sums unless those rows hold inf / NaN).

No interpreter runs Gluon: the CPU tests never reach this module's kernels (tests/gpu compare its
grads bitwise with the Triton kernel's; tools/bench/attn_bwd.py --fused times it).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from miles_kernels._triton.attention_bwd import WAIT_TURN_PTX
from miles_kernels._triton.gluon_attention import CONSUMER_REGS, _mma_layout, _slot_barriers
from miles_kernels._triton.gluon_attention_bwd import (_begin, _desc, _dv_ds, _load_pair, _program, _rows_at,
                                                      _store_dkdv, supported)  # noqa: F401 (supported: re-exported)

BLOCK_M, HALF, STAGES = 64, 64, 2  # query rows a step, keys a consumer (128 a program), q / dout ring slots
SIDE_REGS = 24  # registers a thread of the producer and writers (the third warpgroup's share)
NT = gl.constexpr(32)  # turn arrivals a program and writer: its warp's lanes
LANE_FLOATS = gl.constexpr(4)  # a writer lane's load, one 16-byte vector (its 24 registers)
# Who finishes a query block's sum at its diagonal KV block (the program's last 2G steps): its
# consumers, the tile's loads all in flight (True), or the writers, one chunk's load from L2 at a
# time (False); same values. The writers' is faster: the consumers' version adds spills to their
# loop (sm_90 compile: 21 / 6 -> 38 / 34 a step), 0.6B 16k 8.94 vs 8.18 ms (H200, 2026-12-05).
DIAGONAL_IN_CONSUMER = False


@gluon.jit
def _step_at(s, n_q, kvh, G: gl.constexpr):
    """Step s's (query block, query head): the blocks downwards from the sequence's last, heads inner."""
    return n_q - 1 - s // G, kvh * G + s % G


@gluon.jit
def _load(q_desc, do_desc, k_desc, v_desc, k0, v0, k1, v1, q_smem, do_smem, ready, empty, kv_bar, n0, kvh, q_lo, n_q,
          n_steps, G: gl.constexpr):
    """Producer: both halves' K, V once, then each step's q, dout into the ring as both consumers
    free a slot."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    RING: gl.constexpr = q_smem.type.shape[0]
    _load_pair(k_desc, v_desc, k0, v0, k1, v1, kv_bar, q_lo + n0, kvh * D)
    for s in range(n_steps):
        slot = s % RING
        i, h = _step_at(s, n_q, kvh, G)
        mbarrier.wait(empty.index(slot), ((s // RING) & 1) ^ 1)  # phase 1 starts complete
        bar = ready.index(slot)
        mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_lo + i * BM, h * D], bar, q_smem.index(slot))
        tma.async_copy_global_to_shared(do_desc, [q_lo + i * BM, h * D], bar, do_smem.index(slot))


@gluon.jit
def _dkdvq_step(dk, dv, k_smem, v_smem, k0, k1, q_s, do_s, ds_smem, ds_bar, lse2, delta, s, i, i_full, n_q_full, kpos,
                q_len, qk_scale, C: gl.constexpr):
    """Add query block i to consumer C's dk, dv and return its columns of the block's dQ part
    (fp32 [BLOCK_M, D / 2]): dS^T to shared memory (slot s % 2 of ds_smem's pairs), both halves'
    there (ds_bar), dS k over the program's 128 keys."""
    D: gl.constexpr = q_s.type.shape[1]
    BM: gl.constexpr = q_s.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    dv, dsT = _dv_ds(dv, k_smem, v_smem, q_s, do_s, lse2, delta, i, i_full, n_q_full, kpos, q_len, qk_scale)
    ds16 = dsT.to(q_s.dtype)
    buf = s % 2
    ds_smem.index(2 * buf + C).store(ds16)
    fence_async_shared()  # the stores before the wgmmas (both consumers') read them
    gl.thread_barrier()
    mbarrier.arrive(ds_bar.index(buf))
    dk = warpgroup_mma(gl.convert_layout(ds16, op_layout), q_s, dk, is_async=True)
    mbarrier.wait(ds_bar.index(buf), (s // 2) & 1)
    dv = warpgroup_mma_wait(num_outstanding=1, deps=(dv, ))  # P^T's registers free before dQ's accumulator
    zero = gl.zeros([BM, D // 2], gl.float32, _mma_layout(D // 2, NW))
    dq = warpgroup_mma(ds_smem.index(2 * buf).permute((1, 0)), k0.slice(C * (D // 2), D // 2, 1), zero,
                       use_acc=False, is_async=True)
    dq = warpgroup_mma(ds_smem.index(2 * buf + 1).permute((1, 0)), k1.slice(C * (D // 2), D // 2, 1), dq,
                       is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq))


@gluon.jit
def _consumer_step(dk, dv, k_smem, v_smem, k0, k1, q_smem, do_smem, ds_smem, ready, empty, ds_bar, lse_ptr, delta_ptr,
                   lse2, delta, s, kvh, q_lo, q_len, n_q, n_steps, i_full, n_q_full, kpos, qk_scale, stride_lh,
                   stride_dh, G: gl.constexpr, C: gl.constexpr):
    """Step s of a consumer: its ring slot waited, used (_dkdvq_step) and released; step s + 1's LSE
    and delta loaded first. Returns (dk, dv, the step's dQ columns, the next LSE and delta)."""
    BM: gl.constexpr = q_smem.type.shape[1]
    RING: gl.constexpr = q_smem.type.shape[0]
    i_n, h_n = _step_at(s + 1, n_q, kvh, G)
    lse2_n, delta_n = _rows_at(lse_ptr, delta_ptr, i_n, h_n, q_lo, q_len, stride_lh, stride_dh, s + 1 < n_steps, BM)
    slot = s % RING
    mbarrier.wait(ready.index(slot), (s // RING) & 1)
    dk, dv, dq = _dkdvq_step(dk, dv, k_smem, v_smem, k0, k1, q_smem.index(slot), do_smem.index(slot), ds_smem, ds_bar,
                             lse2, delta, s, n_q - 1 - s // G, i_full, n_q_full, kpos, q_len, qk_scale, C)
    gl.thread_barrier()  # every warp is past its wgmma wait before the arrive
    mbarrier.arrive(empty.index(slot))
    return dk, dv, dq, lse2_n, delta_n


@gluon.jit
def _hand(dq, dq_smem, dq_full, dq_free, s):
    """Step s's dQ columns (fp32 [BM, HD]) to the writer's dq_smem once it has read step s - 1's."""
    BM: gl.constexpr = dq.type.shape[0]
    HD: gl.constexpr = dq.type.shape[1]
    rows_layout: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[HD, 4]], [BM, HD], [1, 0])
    mbarrier.wait(dq_free, (s & 1) ^ 1)
    dq_smem._reinterpret(gl.float32, [BM, HD], rows_layout).store(dq)  # the same bytes
    gl.thread_barrier()
    mbarrier.arrive(dq_full)


@gluon.jit
def _consume(k_smem, v_smem, k0, k1, q_smem, do_smem, ds_smem, dq_smem, ready, empty, ds_bar, dq_full, dq_free, kv_bar,
             dk_ptr, dv_ptr, dq_ptr, acc_ptr, turn_ptr, lse_ptr, delta_ptr, n0, kvh, q_lo, q_len, n_q, n_steps, n_hand,
             qk_scale, scale, stride_kt, stride_qt, stride_lh, stride_dh, stride_sh, G: gl.constexpr, C: gl.constexpr,
             DIAG: gl.constexpr):
    """Consumer C: keys n0 + C * HALF .. + HALF (k_smem, v_smem) over every step; each step's dQ
    columns to dq_smem (its writer's) once that writer freed it, but with DIAG the diagonal's
    steps (the last ones, from n_hand on), which it finishes itself (_diagonal); then dK, dV."""
    BM: gl.constexpr = q_smem.type.shape[1]
    D: gl.constexpr = q_smem.type.shape[2]
    BN: gl.constexpr = k_smem.type.shape[0]
    nc = n0 + C * BN
    i_full, n_q_full, kpos, dk, dv = _begin(kv_bar, nc, q_len, BM, BN, D)
    i, h = _step_at(0, n_q, kvh, G)
    lse2, delta = _rows_at(lse_ptr, delta_ptr, i, h, q_lo, q_len, stride_lh, stride_dh, True, BM)
    for s in range(n_steps):
        dk, dv, dq, lse2, delta = _consumer_step(dk, dv, k_smem, v_smem, k0, k1, q_smem, do_smem, ds_smem, ready, empty,
                                                 ds_bar, lse_ptr, delta_ptr, lse2, delta, s, kvh, q_lo, q_len, n_q,
                                                 n_steps, i_full, n_q_full, kpos, qk_scale, stride_lh, stride_dh, G, C)
        if DIAG:
            if s < n_hand:
                _hand(dq, dq_smem, dq_full, dq_free, s)
            else:
                if s == n_hand:
                    mbarrier.wait(dq_free, (s & 1) ^ 1)  # the writer has read the last handed tile
                i_d, h_d = _step_at(s, n_q, kvh, G)
                _diagonal(dq, dq_smem, acc_ptr, dq_ptr, turn_ptr + h_d.to(gl.int64) * stride_sh + i_d, n0 // (2 * BN),
                          i_d * BM, q_lo, q_len, (2 * h_d + C) * (D // 2), scale, stride_qt)
        else:
            _hand(dq, dq_smem, dq_full, dq_free, s)
    _store_dkdv(dk, dv, dk_ptr, dv_ptr, nc, q_lo, q_len, kvh, scale, stride_kt)


@gluon.jit
def _wait_turn(turn_ptr, target):
    """Every lane spins until the counter at turn_ptr reaches target, then fence.acq_rel.gpu: the
    reads and adds after it come after the adds of the lanes that passed the turns."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    zero = gl.zeros([32 * gl.num_warps()], gl.int32, layout)
    gl.inline_asm_elementwise(WAIT_TURN_PTX, "=r,r,r,l", [zero, zero + target, turn_ptr + zero], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _diagonal(dq, dq_smem, acc_ptr, dq_ptr, turn, j, m0, q_lo, q_len, col0, scale, stride_qt):
    """KV block j's step of the query block of rows m0 .. (j its diagonal: the last to add) in this
    consumer's columns col0 .. : once every lower block has added (its turn), dq = (part + sum) *
    scale, attention_bwd._dq_turn's last step, rows inside the sequence. The part goes through
    dq_smem (its writer is done with it) into 16-byte rows, so the tile's loads from L2 go out
    together from the consumer's threads (a 1-warp writer's 24 registers take one 2-row chunk's
    load at a time: 32 round trips a step)."""
    BM: gl.constexpr = dq.type.shape[0]
    HD: gl.constexpr = dq.type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    view = dq_smem._reinterpret(gl.float32, [BM, HD], gl.PaddedSharedLayout.with_identity_for([[HD, 4]], [BM, HD],
                                                                                               [1, 0]))
    view.store(dq)
    if j > 0:
        _wait_turn(turn, j * 2 * NT)
    gl.thread_barrier()
    layout: gl.constexpr = gl.BlockedLayout([1, LANE_FLOATS], [32 * LANE_FLOATS // HD, HD // LANE_FLOATS], [NW, 1],
                                            [1, 0])
    part = view.load(layout)
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    tile = rows[:, None] * stride_qt + gl.arange(0, HD, layout=gl.SliceLayout(0, layout))[None, :]
    base = (q_lo + m0).to(gl.int64) * stride_qt + col0
    ok = (m0 + rows < q_len)[:, None]
    acc = gl.load(acc_ptr + base + tile, mask=ok & (j > 0), other=0.0, cache_modifier=".cg")
    gl.store(dq_ptr + base + tile, ((part + acc) * scale).to(dq_ptr.dtype.element_ty), mask=ok)
    gl.thread_barrier()  # every warp has read the tile before the next step's store


@gluon.jit
def _add_part(dq_smem, acc_ptr, dq_ptr, off, tile_off, rows, m0, j, j_last, q_len, scale, stride_qt,
              DIAG: gl.constexpr):
    """A step's dQ part (dq_smem: [chunks, R, HD], rows m0 .. m0 + chunks * R from the scalar offset
    off, tile_off the chunk's offsets) into the query block's sum as attention_bwd._dq_turn: KV block
    0 stores, later ones add, the last writes dq = (part + sum) * scale (with DIAG the consumers
    take the last ones); only rows inside the sequence."""
    if DIAG:
        _sum_part(dq_smem, acc_ptr, off, tile_off, rows, m0, j, q_len, stride_qt)
    elif j == j_last:  # one chunk's load from L2 at a time (DIAGONAL_IN_CONSUMER)
        CH: gl.constexpr = dq_smem.type.shape[0]
        R: gl.constexpr = dq_smem.type.shape[1]
        for x in range(CH):
            part = dq_smem.index(x).load(tile_off.type.layout)
            ok = (m0 + x * R + rows < q_len)[:, None]
            o = off + x * R * stride_qt + tile_off
            acc = gl.load(acc_ptr + o, mask=ok & (j > 0), other=0.0, cache_modifier=".cg")
            gl.store(dq_ptr + o, ((part + acc) * scale).to(dq_ptr.dtype.element_ty), mask=ok)
    else:
        _sum_part(dq_smem, acc_ptr, off, tile_off, rows, m0, j, q_len, stride_qt)


@gluon.jit
def _sum_part(dq_smem, acc_ptr, off, tile_off, rows, m0, j, q_len, stride_qt):
    """_add_part below the last KV block: block 0 stores the part, later ones add it."""
    CH: gl.constexpr = dq_smem.type.shape[0]
    R: gl.constexpr = dq_smem.type.shape[1]
    layout: gl.constexpr = tile_off.type.layout
    if j == 0:
        for x in range(CH):
            part = dq_smem.index(x).load(layout)
            ok = (m0 + x * R + rows < q_len)[:, None]
            gl.store(acc_ptr + off + x * R * stride_qt + tile_off, part, mask=ok)
    else:
        for x in range(CH):
            part = dq_smem.index(x).load(layout)
            ok = (m0 + x * R + rows < q_len)[:, None] & (tile_off >= 0)
            _red_add(acc_ptr + off + x * R * stride_qt + tile_off, part, ok)


@gluon.jit
def _red_add(ptr, val, ok):
    """ptr += val where ok (fp32, relaxed, gpu scope): one red.global.add.v4.f32 for each thread's 4
    adjacent elements (the layout's 4 columns a thread, 16-byte aligned), where gl.atomic_add
    issues one atomic an element. Its rounding is the scalar atomics' (REDG .F32x4.FTZ.RN vs
    .F32.FTZ.RN), so the sums are the Triton kernel's."""
    gl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $12, 0;
        @p red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};
        mov.b32 $0, 0;
        mov.b32 $1, 0;
        mov.b32 $2, 0;
        mov.b32 $3, 0;
        }""", "=r,=r,=r,=r,l,l,l,l,f,f,f,f,r,r,r,r", [ptr.to(gl.int64), val, ok.to(gl.int32)], dtype=gl.int32,
        is_pure=False, pack=4)


@gluon.jit
def _write(dq_smem, dq_full, dq_free, acc_ptr, dq_ptr, turn_ptr, j, kvh, q_lo, q_len, n_q, n_hand, scale, stride_qt,
           stride_sh, G: gl.constexpr, BN: gl.constexpr, C: gl.constexpr, DIAG: gl.constexpr):
    """Writer C (1 warp): consumer C's dQ columns of its first n_hand steps (dq_smem) into the query
    block's sum in KV-block order (KV block j of BN keys waits for its turn: both writers of each
    block below passed it), then the turn passed on (but by the last)."""
    R: gl.constexpr = dq_smem.type.shape[1]
    HD: gl.constexpr = dq_smem.type.shape[2]
    BM: gl.constexpr = dq_smem.type.shape[0] * R
    gl.static_assert(32 * LANE_FLOATS // HD == R, "a chunk is one warp's load: no lane repeats another's adds")
    layout: gl.constexpr = gl.BlockedLayout([1, LANE_FLOATS], [R, HD // LANE_FLOATS], [gl.num_warps(), 1], [1, 0])
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    rows = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    tile_off = rows[:, None] * stride_qt + gl.arange(0, HD, layout=gl.SliceLayout(0, layout))[None, :]
    for s in range(n_hand):
        i, h = _step_at(s, n_q, kvh, G)
        m0 = i * BM
        j_last = (gl.minimum(m0 + BM, q_len) - 1) // BN  # the KV block of the block's last row
        turn = turn_ptr + h.to(gl.int64) * stride_sh + i
        mbarrier.wait(dq_full, s & 1)
        if j > 0:
            _wait_turn(turn, j * 2 * NT)
        off = (q_lo + m0).to(gl.int64) * stride_qt + (2 * h + C) * HD
        _add_part(dq_smem, acc_ptr, dq_ptr, off, tile_off, rows, m0, j, j_last, q_len, scale, stride_qt, DIAG)
        if j < j_last:  # each lane releases its own adds
            one = gl.full([32 * gl.num_warps()], 1, gl.int32, lanes)
            gl.atomic_add(turn + one * 0, one, sem="release", scope="gpu")
        gl.thread_barrier()  # every lane has read the tile before the one arrive
        mbarrier.arrive(dq_free)


@gluon.jit
def _dkdvq_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, dk_ptr, dv_ptr, acc_ptr, turn_ptr, lse_ptr, delta_ptr,
                  cu_ptr, qk_scale, scale, n_kv_heads, n_bk, stride_qt, stride_kt, stride_lh, stride_dh, stride_sh,
                  G: gl.constexpr, STAGES: gl.constexpr, SIDE_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  DIAG: gl.constexpr):
    """One program a (2 x HALF keys, sequence, kv head): producer, two consumers, two writers."""
    BN: gl.constexpr = k_desc.block_type.shape[0]
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    n0, kvh, q_lo, q_len = _program(cu_ptr, n_kv_heads, n_bk, 2 * BN)
    if n0 >= q_len:
        return
    b = (gl.program_id(0) % n_bk) // n_kv_heads
    k0 = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v0 = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    k1 = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v1 = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BM, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BM, D], q_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BM], q_desc.dtype)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [4, BN, BM], ds_layout)  # [step % 2, consumer]
    # a consumer's dQ columns in chunks of R rows, one 32-lane writer load each (R = 2 at D = 128, 4
    # at 64: no lane holds another's elements, whose red.add would count twice), 4 floats of
    # padding a row: a store's 8 rows x 32 bytes land in 2 wavefronts, whatever rows a chunk holds
    R: gl.constexpr = 32 * LANE_FLOATS // (D // 2)
    dq_layout: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[D // 2, 4]], [R, D // 2], [1, 0])
    dq0 = gl.allocate_shared_memory(gl.float32, [BM // R, R, D // 2], dq_layout)
    dq1 = gl.allocate_shared_memory(gl.float32, [BM // R, R, D // 2], dq_layout)
    ready = _slot_barriers(STAGES)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=2)
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(2):
        mbarrier.init(ds_bar.index(s), count=2)
    dq_full = _slot_barriers(2)  # a consumer's tile written, for its writer
    dq_free = _slot_barriers(2)  # and read
    kv_bar = _slot_barriers(1).index(0)
    n_q = gl.cdiv(q_len, BM)
    n_steps = G * (n_q - n0 // BM)
    # the steps the writers take: all, or with DIAG those before the diagonal's query blocks (the
    # last steps: blocks n0 // BM .. (n0 + 2 * BN) // BM - 1, which no later KV block reaches)
    n_hand = n_steps
    if DIAG:
        n_hand = G * gl.maximum(n_q - (n0 + 2 * BN) // BM, 0)
    turn_b = turn_ptr + q_lo // BM + b  # the sequence's query blocks' counters
    gl.warp_specialize([
        (_consume, (k0, v0, k0, k1, q_smem, do_smem, ds_smem, dq0, ready, empty, ds_bar, dq_full.index(0),
                    dq_free.index(0), kv_bar, dk_ptr, dv_ptr, dq_ptr, acc_ptr, turn_b, lse_ptr, delta_ptr, n0, kvh,
                    q_lo, q_len, n_q, n_steps, n_hand, qk_scale, scale, stride_kt, stride_qt, stride_lh, stride_dh,
                    stride_sh, G, 0, DIAG)),
        (_consume, (k1, v1, k0, k1, q_smem, do_smem, ds_smem, dq1, ready, empty, ds_bar, dq_full.index(1),
                    dq_free.index(1), kv_bar, dk_ptr, dv_ptr, dq_ptr, acc_ptr, turn_b, lse_ptr, delta_ptr, n0, kvh,
                    q_lo, q_len, n_q, n_steps, n_hand, qk_scale, scale, stride_kt, stride_qt, stride_lh, stride_dh,
                    stride_sh, G, 1, DIAG)),
        (_load, (q_desc, do_desc, k_desc, v_desc, k0, v0, k1, v1, q_smem, do_smem, ready, empty, kv_bar, n0, kvh, q_lo,
                 n_q, n_steps, G)),
        (_write, (dq0, dq_full.index(0), dq_free.index(0), acc_ptr, dq_ptr, turn_b, n0 // (2 * BN), kvh, q_lo,
                  q_len, n_q, n_hand, scale, stride_qt, stride_sh, G, 2 * BN, 0, DIAG)),
        (_write, (dq1, dq_full.index(1), dq_free.index(1), acc_ptr, dq_ptr, turn_b, n0 // (2 * BN), kvh, q_lo,
                  q_len, n_q, n_hand, scale, stride_qt, stride_sh, G, 2 * BN, 1, DIAG)),
    ], [4, 1, 1, 1], [CONSUMER_REGS, SIDE_REGS, SIDE_REGS, SIDE_REGS])


def dkdvq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
          dv: torch.Tensor, lse_HT: torch.Tensor, delta_HT: torch.Tensor, cu: torch.Tensor, max_len: int,
          scale: float) -> None:
    """dq [T, H, D], dk, dv [T, K, D] (contiguous, written) of contiguous q, dout [T, H, D] and k, v
    [T, K, D]; the caller checked `supported` (gluon_attention_bwd's conditions). Scratch: an fp32
    [T, H, D] sum and the turn counters."""
    T, H, D = q.shape
    K = k.shape[1]
    B = cu.shape[0] - 1
    n_turns = T // BLOCK_M + B + 1  # a sequence's query blocks from q_lo // BLOCK_M + its index
    acc = torch.empty((T, H, D), dtype=torch.float32, device=q.device)
    turns = torch.zeros((H, n_turns), dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(max_len, 2 * HALF) * B * K, )
    _dkdvq_kernel[grid](_desc(q, BLOCK_M), _desc(do, BLOCK_M), _desc(k, HALF), _desc(v, HALF), dq, dk, dv, acc, turns,
                        lse_HT, delta_HT, cu, scale * 1.4426950408889634, scale, K, B * K, H * D, K * D,
                        lse_HT.stride(0), delta_HT.stride(0), n_turns, G=H // K, STAGES=STAGES, SIDE_REGS=SIDE_REGS,
                        CONSUMER_REGS=CONSUMER_REGS, DIAG=DIAGONAL_IN_CONSUMER, num_warps=4, maxnreg=168)
