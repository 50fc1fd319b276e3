"""The packed causal GQA attention backward's dK / dV and dQ as Gluon kernels for Hopper (sm_90):
attention_bwd's `_dkdv_kernel` and `_dq_kernel` (same math, grids, masks and MMA order: the same
values). dK / dV 1.09-1.23x the Triton kernel (tools/bench/gluon_dkdv.py, 2026-12-04 twenty-first
run); dQ (`_dq_kernel` here: q and dout resident, K / V through a TMA ring, S and dP wgmmas
together, then dS k) 1.02-1.32x (tools/bench/gluon_dq.py), behind attention_bwd.GLUON_DQ.

dK / dV: one program per (KV block of BLOCK_N keys, sequence, kv head), looping over its G query heads
and the query blocks at or after the KV block as one flat loop of steps; dV = P^T dout,
dK = scale * dS^T q, with P recomputed from the LSE in log2 units and dS = P * (dout v^T - delta):

    K, V       one TMA load each into shared memory, resident for the program
    q, dout    TMA loads into a STAGES-deep shared-memory ring, one mbarrier a slot, issued
               STAGES - 1 steps ahead (the ring prefetches across heads)
    LSE, delta each step's loaded a step ahead, one a thread (waiting on them at the step's exp2
               made the first version 0.66x the Triton kernel)
    MMAs       wgmma, async: S^T = k q^T and dP^T = v dout^T together, then dV += P^T dout and
               dK += dS^T q with P^T / dS^T from registers; fp32 dK, dV in registers

No interpreter runs Gluon: the CPU tests never reach this module's kernels.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from miles_kernels._triton.gluon_attention import _load_kv, _mma_layout, _slot_barriers

_LOG2E = gl.constexpr(1.4426950408889634)
BLOCK_M, BLOCK_N, NUM_WARPS, STAGES = 64, 64, 4, 2  # attention_bwd's full-GPU dK/dV tile
# dQ's: 64 query rows and one warpgroup, a 2-slot K/V ring (tools/bench/gluon_dq.py, 2026-12-04
# twenty-first run: 1.02x the Triton dQ kernel at 0.6B 16k, 1.17x at 4k, 1.32x packed; the same
# values, any query tile: a row's sum runs over the KV blocks in order)
DQ_BLOCK_M, DQ_NUM_WARPS, DQ_STAGES = 64, 4, 2


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
    """Step t's query rows' LSE (log2 units) and delta, loaded ahead of the step (pred off: zeros):
    a load issued a step early is not waited on at the step's exp2. Held one a thread (the MMA
    layout's slice would take 32 registers), moved into _step's layout there."""
    NW: gl.constexpr = gl.num_warps()
    qpos = (i_lo + t % n_i) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    ok = (qpos < q_len) & pred
    h = (kvh * G + t // n_i).to(gl.int64)
    lse = gl.load(lse_ptr + h * stride_lh + q_lo + qpos, mask=ok, other=0.0)
    delta = gl.load(delta_ptr + h * stride_dh + q_lo + qpos, mask=ok, other=0.0)
    return lse * _LOG2E, delta


@gluon.jit
def _step(dk, dv, k_smem, v_smem, q_s, do_s, lse2, delta, t, i_lo, n_i, i_full, n_q_full, kpos, q_len, qk_scale):
    """Add step t's query block (rows in q_s / do_s; their LSE in log2 units and delta from _rows)
    to dk, dv (as attention_bwd._dkdv_step). Its four wgmmas: S^T and dP^T issued together, dV's
    issued before dS^T is made, all waited here."""
    BLOCK_M: gl.constexpr = q_s.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = _mma_layout(BLOCK_M, NW)  # S^T, dP^T: [BLOCK_N, BLOCK_M]
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    i = i_lo + t % n_i
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
    dsT = pT * (dpT - gl.convert_layout(delta, gl.SliceLayout(0, s_layout))[None, :])
    dk = warpgroup_mma(gl.convert_layout(dsT.to(q_s.dtype), op_layout), q_s, dk, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))


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
def _alloc(a_desc, b_desc, ring_a_desc, ring_b_desc, STAGES: gl.constexpr):
    """Shared memory of a program: two resident tiles (a, b: K and V for dK/dV, q and dout for
    dQ), a STAGES-slot ring of the other two, the ring's ready mbarriers and the resident tiles'
    (initialised, count 1)."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    ring_shape: gl.constexpr = [STAGES, ring_a_desc.block_type.shape[0], ring_a_desc.block_type.shape[1]]
    ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, ring_shape, ring_a_desc.layout)
    ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, ring_shape, ring_b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    return a_smem, b_smem, ring_a, ring_b, _slot_barriers(STAGES), bar


@gluon.jit
def _start(kv_bar, lse_ptr, delta_ptr, n0, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, D: gl.constexpr, G: gl.constexpr):
    """The start of a dK / dV loop over keys n0 .. n0 + BLOCK_N: (the first query block that sees
    every key whole, the count of blocks that end inside the sequence, the keys' positions, zeroed
    dK and dV, step 0's LSE and delta), once K and V have landed (kv_bar)."""
    NW: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = _mma_layout(D, NW)  # dK, dV: [BLOCK_N, D]
    kpos = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, _mma_layout(BLOCK_M, NW)))
    dk = gl.zeros([BLOCK_N, D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    lse2, delta = _rows(lse_ptr, delta_ptr, 0, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh, True, BLOCK_M,
                        BLOCK_N, G)
    return gl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), q_len // BLOCK_M, kpos, dk, dv, lse2, delta


@gluon.jit
def _dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale,
                     n_kv_heads, n_bk, stride_kt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr):
    """One program a (KV block, sequence, kv head): its G heads' query blocks from the diagonal on,
    the compute warps issuing each step's q / dout TMA loads STAGES - 1 steps ahead."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    n0, kvh, q_lo, q_len = _program(cu_ptr, n_kv_heads, n_bk, BLOCK_N)
    if n0 >= q_len:
        return
    k_smem, v_smem, q_smem, do_smem, ready, kv_bar = _alloc(k_desc, v_desc, q_desc, do_desc, STAGES)

    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [q_lo + n0, kvh * D], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [q_lo + n0, kvh * D], kv_bar, v_smem)
    i_lo = n0 // BLOCK_M
    n_i = gl.cdiv(q_len, BLOCK_M) - i_lo  # query blocks a head: the diagonal's to the sequence's last
    n_steps = G * n_i
    for s in gl.static_range(STAGES - 1):
        _load_q_do(q_desc, do_desc, q_smem.index(s), do_smem.index(s), ready.index(s), s, i_lo, n_i, q_lo, kvh,
                   s < n_steps, G)
    i_full, n_q_full, kpos, dk, dv, lse2, delta = _start(kv_bar, lse_ptr, delta_ptr, n0, i_lo, n_i, q_lo, q_len, kvh,
                                                         stride_lh, stride_dh, BLOCK_M, BLOCK_N, D, G)
    for t in range(n_steps):
        # the slot step t - 1 used is free (its wgmmas were waited): step t + STAGES - 1 goes there.
        # The barrier: every warp is past those waits before one thread issues the copy.
        gl.thread_barrier()
        nxt = t + STAGES - 1
        _load_q_do(q_desc, do_desc, q_smem.index(nxt % STAGES), do_smem.index(nxt % STAGES),
                   ready.index(nxt % STAGES), nxt, i_lo, n_i, q_lo, kvh, nxt < n_steps, G)
        lse2_n, delta_n = _rows(lse_ptr, delta_ptr, t + 1, i_lo, n_i, q_lo, q_len, kvh, stride_lh, stride_dh,
                                t + 1 < n_steps, BLOCK_M, BLOCK_N, G)
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        dk, dv = _step(dk, dv, k_smem, v_smem, q_smem.index(slot), do_smem.index(slot), lse2, delta, t, i_lo, n_i,
                       i_full, n_q_full, kpos, q_len, qk_scale)
        lse2, delta = lse2_n, delta_n
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    mbarrier.invalidate(kv_bar)
    _store_dkdv(dk, dv, dk_ptr, dv_ptr, n0, q_lo, q_len, kvh, scale, stride_kt)



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
def _load_q_do_once(q_desc, do_desc, q_smem, do_smem, q_bar, m0, q_lo, h):
    """The query block's q and dout tiles, once (rows past the sequence: ignored, never stored)."""
    D: gl.constexpr = q_desc.block_type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_lo + m0, h * D], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [q_lo + m0, h * D], q_bar, do_smem)


@gluon.jit
def _dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, cu_ptr, qk_scale, scale, n_heads,
                   n_bh, n_blocks, stride_qt, stride_lh, stride_dh, G: gl.constexpr, STAGES: gl.constexpr):
    """One program a (query block, sequence, query head), the last query blocks first: its q and
    dout resident, the KV blocks up to the diagonal through a TMA ring the compute warps fill
    STAGES - 1 steps ahead."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    NW: gl.constexpr = gl.num_warps()
    # grid rank-major over (rank, sequence, query head) as _dq_kernel; rank r is query block
    # n_blocks - 1 - r: the last (most KV blocks) start first
    r0, h, q_lo, q_len = _program(cu_ptr, n_heads, n_bh, BLOCK_M)
    m0 = (n_blocks - 1) * BLOCK_M - r0
    if m0 >= q_len:
        return
    kvh = h // G
    q_smem, do_smem, k_smem, v_smem, ready, q_bar = _alloc(q_desc, do_desc, k_desc, v_desc, STAGES)
    _load_q_do_once(q_desc, do_desc, q_smem, do_smem, q_bar, m0, q_lo, h)
    qpos, lse2, delta, n_full, n_kv = _dq_rows(lse_ptr, delta_ptr, h, q_lo, q_len, m0, stride_lh, stride_dh,
                                            BLOCK_M, BLOCK_N)
    for s in gl.static_range(STAGES - 1):
        _load_kv(k_desc, v_desc, k_smem.index(s), v_smem.index(s), ready.index(s), s, q_lo, kvh, s < n_kv)

    dq = gl.zeros([BLOCK_M, D], gl.float32, _mma_layout(D, NW))
    mbarrier.wait(q_bar, 0)
    for j in range(n_kv):
        # the slot step j - 1 used is free (its wgmmas were waited): step j + STAGES - 1 goes there.
        # The barrier: every warp is past those waits before one thread issues the copy.
        gl.thread_barrier()
        nxt = j + STAGES - 1
        _load_kv(k_desc, v_desc, k_smem.index(nxt % STAGES), v_smem.index(nxt % STAGES), ready.index(nxt % STAGES),
                 nxt, q_lo, kvh, nxt < n_kv)
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        dq = _dq_step(dq, q_smem, do_smem, k_smem.index(slot), v_smem.index(slot), lse2, delta, qpos, j, n_full,
                   qk_scale)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    mbarrier.invalidate(q_bar)
    _store_rows(dq, dq_ptr, m0, q_lo, q_len, h, scale, stride_qt)


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
    grid = (triton.cdiv(max_len, BLOCK_N) * B * K, )
    _dkdv_kernel[grid](_desc(q, BLOCK_M), _desc(do, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), dk, dv, lse_HT,
                       delta_HT, cu, scale * 1.4426950408889634, scale, K, B * K, K * D, lse_HT.stride(0),
                       delta_HT.stride(0), G=H // K, STAGES=STAGES, num_warps=NUM_WARPS)


def dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dq_out: torch.Tensor, lse_HT: torch.Tensor,
       delta_HT: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float) -> None:
    """dq_out (contiguous [T, H, D], written) of contiguous q, dout [T, H, D] and k, v [T, K, D];
    the caller checked `supported`."""
    T, H, D = q.shape
    K = k.shape[1]
    B = cu.shape[0] - 1
    n_blocks = triton.cdiv(max_len, DQ_BLOCK_M)
    _dq_kernel[(n_blocks * B * H, )](_desc(q, DQ_BLOCK_M), _desc(do, DQ_BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N),
                                     dq_out, lse_HT, delta_HT, cu, scale * 1.4426950408889634, scale, H, B * H,
                                     n_blocks, H * D, lse_HT.stride(0), delta_HT.stride(0), G=H // K,
                                     STAGES=DQ_STAGES, num_warps=DQ_NUM_WARPS)
