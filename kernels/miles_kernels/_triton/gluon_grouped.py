"""grouped_linear (MoE experts) as a Gluon kernel for Hopper (sm_90): the bits of matmul's
`_grouped_tma_kernel` (the same tiles in the same order, each output element one wgmma chain over K
in BLOCK_K steps into fp32), FlashAttention-3 / CUTLASS's warp-specialized schedule, and half tiles
where an expert's rows end.

    partitions  a 1-warp producer issues the TMA loads of x (two 64-row halves) and w into a
                STAGES-deep shared-memory ring (ready / empty mbarriers a slot); two 4-warp
                consumers own one half of the 128-row tile each and share its w tile
    tails       an expert's rows rarely fill its last tile: where they end within the first half
                the second consumer issues no wgmma (its rows are another expert's, never stored),
                so the tensor cores run the first consumer's alone: an expert costs its rows in
                64-row units, not 128 (Qwen3-30B-A3B at 4,096 tokens: ~288 rows an expert)
    persistent  one program an SM; tiles in matmul's grouped order over the row tiles in expert order

No interpreter runs Gluon: the CPU tests run the Triton kernel, tests/gpu compare the two bitwise.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from miles_kernels._triton.gluon_attention import CONSUMER_REGS, _mma_layout, _slot_barriers

BLOCK_M, BLOCK_K = 128, 64  # the Triton TMA tiles' (64 rows a consumer); BLOCK_K fixes the bits
STAGES = 3  # ring slots (x halves + w tile: 48 KB a slot at BLOCK_N 256)
# registers a thread of the producer warp (its group of 4 warps): the experts' offsets take ~20 at
# 128 experts (24 spilled 48 B on sm_90); with maxnreg 168 the first consumer then gets 232
LOAD_REGS = 32


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _schedule(off_ptr, N, K, E, n_tiles_m, E_PAD: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_K: gl.constexpr):
    """What every partition walks: each expert's (first row, end row, row tiles, row tiles up to
    its end) as matmul._expert_tile counts them, the row tiles that hold rows (at most the host's
    bound n_tiles_m), the column tiles and the K steps a tile."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    es = gl.arange(0, E_PAD, layout=layout)
    lo = gl.load(off_ptr + es, mask=es < E, other=0)
    hi = gl.load(off_ptr + es + 1, mask=es < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = gl.associative_scan(tiles, 0, _add)
    return (es, lo, hi, tiles, ends, gl.minimum(gl.sum(tiles, 0), n_tiles_m), gl.cdiv(N, BLOCK_N),
            gl.cdiv(K, BLOCK_K))


@gluon.jit
def _tile(tile, sched, BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr):
    """(expert, first row, end of the expert's rows, column tile) of tile number `tile` in
    matmul._grouped_order over the row tiles in expert order (matmul._expert_tile)."""
    es, lo, hi, tiles, ends, n_real_m, n_tiles_n, _ = sched
    per_group = GROUP_M * n_tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_size = gl.minimum(n_real_m - first_m, GROUP_M)
    tile_m = first_m + (tile % per_group) % group_size
    e = gl.sum((ends <= tile_m).to(gl.int32), 0)
    is_e = es == e
    row_lo = gl.sum(gl.where(is_e, lo, 0), 0)
    in_e = tile_m - gl.sum(gl.where(is_e, ends - tiles, 0), 0)
    return e, row_lo + in_e * BLOCK_M, gl.sum(gl.where(is_e, hi, 0), 0), (tile % per_group) // group_size


@gluon.jit
def _produce(x_desc, w_desc, x0, x1, w_smem, ready, empty, off_ptr, N, K, E, n_tiles_m, E_PAD: gl.constexpr,
             GROUP_M: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """Producer partition (1 warp): every K step of this program's tiles into the ring, a slot
    once both consumers freed it. Rows past R (and columns past K) of a box load as zeros."""
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = w_smem.type.shape[0]
    NBYTES: gl.constexpr = 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes
    sched = _schedule(off_ptr, N, K, E, n_tiles_m, E_PAD, 2 * HALF, BLOCK_N, BLOCK_K)
    it = 0
    for tile in range(gl.program_id(0), sched[5] * sched[6], NUM_PROGRAMS):  # real row tiles x column tiles
        e, off_m, row_hi, tile_n = _tile(tile, sched, 2 * HALF, GROUP_M)
        # a second half with no row of the expert (its consumer reads nothing) loads the first
        # half's rows again: no box wholly past x's last row
        off_1 = off_m + HALF * (off_m + HALF < row_hi).to(gl.int32)
        for kk in range(sched[7]):
            s = it % STAGES
            # empty barriers start with phase 1 complete: the first round of waits passes at once
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES)
            tma.async_copy_global_to_shared(x_desc, [off_m, kk * BLOCK_K], bar, x0.index(s))
            tma.async_copy_global_to_shared(x_desc, [off_1, kk * BLOCK_K], bar, x1.index(s))
            tma.async_copy_global_to_shared(w_desc, [e * N + tile_n * BLOCK_N, kk * BLOCK_K], bar, w_smem.index(s))
            it += 1


@gluon.jit
def _store(y_ptr, acc, row0, row_hi, col0, N, stride_yr):
    """A consumer's [64, BLOCK_N] tile in y's dtype: its expert's rows (< row_hi) and columns < N."""
    ROWS: gl.constexpr = acc.shape[0]
    COLS: gl.constexpr = acc.shape[1]
    NW: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])  # 16-byte stores
    y = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), layout)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    ptrs = y_ptr + rows.to(gl.int64)[:, None] * stride_yr + cols[None, :]
    gl.store(ptrs, y, mask=(rows < row_hi)[:, None] & (cols < N)[None, :])


@gluon.jit
def _consume(x_smem, w_smem, ready, empty, off_ptr, y_ptr, N, K, E, n_tiles_m, stride_yr, HALF_IDX: gl.constexpr,
             E_PAD: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """Consumer partition (4 warps): half HALF_IDX of every tile of this program, K steps in
    order, one wgmma chain (the first step without the zero accumulator, as Triton compiles the
    Triton kernel's), a step's slot freed once its wgmma is done. A half with no row of the
    tile's expert only frees the slots."""
    HALF: gl.constexpr = x_smem.type.shape[1]
    BLOCK_N: gl.constexpr = w_smem.type.shape[1]
    BLOCK_K: gl.constexpr = w_smem.type.shape[2]
    STAGES: gl.constexpr = w_smem.type.shape[0]
    acc_layout: gl.constexpr = _mma_layout(BLOCK_N, gl.num_warps())
    sched = _schedule(off_ptr, N, K, E, n_tiles_m, E_PAD, 2 * HALF, BLOCK_N, BLOCK_K)
    n_k = sched[7]
    it = 0
    for tile in range(gl.program_id(0), sched[5] * sched[6], NUM_PROGRAMS):  # real row tiles x column tiles
        _, off_m, row_hi, tile_n = _tile(tile, sched, 2 * HALF, GROUP_M)
        row0 = off_m + HALF_IDX * HALF
        if row0 < row_hi:
            acc = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
            for kk in range(n_k):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                acc = warpgroup_mma(x_smem.index(s), w_smem.index(s).permute((1, 0)), acc, use_acc=kk > 0,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                if kk > 0:  # step kk - 1's wgmma is done: its slot is free
                    gl.thread_barrier()
                    mbarrier.arrive(empty.index((it - 1) % STAGES))
                it += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(empty.index((it - 1) % STAGES))
            _store(y_ptr, acc, row0, row_hi, tile_n * BLOCK_N, N, stride_yr)
        else:
            for kk in range(n_k):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                gl.thread_barrier()
                mbarrier.arrive(empty.index(s))
                it += 1


@gluon.jit
def _grouped_ws_kernel(x_desc, w_desc, off_ptr, y_ptr, N, K, E, n_tiles_m, stride_yr, E_PAD: gl.constexpr,
                       GROUP_M: gl.constexpr, STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                       LOAD_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    x_shape: gl.constexpr = [STAGES, HALF, x_desc.block_type.shape[1]]
    x0 = gl.allocate_shared_memory(x_desc.dtype, x_shape, x_desc.layout)
    x1 = gl.allocate_shared_memory(x_desc.dtype, x_shape, x_desc.layout)
    w_shape: gl.constexpr = [STAGES, w_desc.block_type.shape[0], w_desc.block_type.shape[1]]
    w_smem = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready = _slot_barriers(STAGES)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=2)  # both consumers
    gl.warp_specialize([
        (_consume, (x0, w_smem, ready, empty, off_ptr, y_ptr, N, K, E, n_tiles_m, stride_yr, 0, E_PAD, GROUP_M,
                    NUM_PROGRAMS)),
        (_consume, (x1, w_smem, ready, empty, off_ptr, y_ptr, N, K, E, n_tiles_m, stride_yr, 1, E_PAD, GROUP_M,
                    NUM_PROGRAMS)),
        (_produce, (x_desc, w_desc, x0, x1, w_smem, ready, empty, off_ptr, N, K, E, n_tiles_m, E_PAD, GROUP_M,
                    NUM_PROGRAMS)),
    ], [4, 1], [CONSUMER_REGS, LOAD_REGS])


def supported(x_RK: torch.Tensor, w_ENK: torch.Tensor, block_m: int, block_n: int, block_k: int) -> bool:
    """Whether launch takes these tensors and tile: CUDA sm_90, bf16 / fp16, the 128-row tile
    walking K in 64-wide steps, 16-byte aligned rows (the TMA kernel's conditions)."""
    if not (x_RK.is_cuda and torch.cuda.get_device_capability(x_RK.device) == (9, 0)):
        return False
    if x_RK.dtype not in (torch.bfloat16, torch.float16) or (block_m, block_k) != (BLOCK_M, BLOCK_K):
        return False
    return block_n in (64, 128, 256) and all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0
                                             for t in (x_RK, w_ENK))


def launch(x_RK, w_ENK, offsets_E1, y_RN, block_n: int, group_m: int, n_tiles_m: int, num_programs: int,
           stages: int | None = None) -> None:
    """y_RN's rows in [offsets[0], offsets[E]) = x_RK @ w_ENK[e]^T by expert (the caller checked
    `supported`; x_RK, w_ENK contiguous); `stages` ring slots (default STAGES)."""
    K = x_RK.shape[1]
    E, N, _ = w_ENK.shape
    dt = gl.bfloat16 if x_RK.dtype == torch.bfloat16 else gl.float16
    half = BLOCK_M // 2
    x_desc = TensorDescriptor.from_tensor(x_RK, [half, BLOCK_K], gl.NVMMASharedLayout.get_default_for([half, BLOCK_K],
                                                                                                     dt))
    w_desc = TensorDescriptor.from_tensor(w_ENK.view(E * N, K), [block_n, BLOCK_K],
                                          gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], dt))
    _grouped_ws_kernel[(num_programs, )](x_desc, w_desc, offsets_E1, y_RN, N, K, E, n_tiles_m, y_RN.stride(0),
                                         E_PAD=triton.next_power_of_2(E), GROUP_M=group_m, STAGES=stages or STAGES,
                                         NUM_PROGRAMS=num_programs, LOAD_REGS=LOAD_REGS, CONSUMER_REGS=CONSUMER_REGS,
                                         num_warps=4, maxnreg=168)
