"""Fused decode linears: linears (q/k/v, gate/up: up to three weights of one x in one launch) and
swiglu (gate and up products and silu_mul in one launch), both for M <= matmul.SMALL_M.

Each output tile walks K as linear's does (from 0 in BLOCK_K steps, fp32 acc), so every output has
linear's bits. The tile is linear_tile's for the summed N; where it is a TMA tile (the 128-row
small-M tiles) and SMALL_M_TMA is on, the weights and x come in by TMA in a persistent grid, as
linear's TMA kernel does (the default); else by pointers. swiglu's persistent grid takes stream-K
where linear's would (streamk.py; off unless MILES_STREAM_K=1).
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_kernels._triton import launch, streamk
from miles_kernels._triton import matmul as mm
from miles_kernels._triton.elementwise import silu_times
from miles_kernels._triton.gdc import gdc_release, gdc_wait, prefetch_rows, release_after_last
from miles_kernels._triton.launch import fast_launch
from miles_kernels._triton.matmul import _bias_store, _linear_tile, _tma_bias_store, _tma_k_walk

# The small-M TMA tiles by TMA here too (False: by pointers). On an H100 (thirty-fifth run,
# linear_sweep --which stages, graph-timed, cold weights) the 128-row tiles read 0.03-0.28 of cuBLAS
# more by TMA than by pointers at M 128-512 on the summed q|k|v and gate|up shapes; on an H200
# (thirty-sixth run, tools/bench/fused_linears.py) these kernels ran 1.04-1.30x the pointer kernels, same bits.
SMALL_M_TMA = True
# linears' TMA kernel stores its tiles by TMA too (the outputs' rows 16-byte multiples), as linear's and swiglu's
# TMA kernels do, in place of masked pointer stores: compiled for sm_90a (triton 3.6, tools/bench/sm90_regs.py),
# 128x128 at 5 stages, 7,040 SASS instructions and 246 registers by pointers, 2,504 and 90 by TMA. Same bits
# (the store only); not yet timed on a GPU, so off: `with_tiles.py --linears-tma-store on` is the A/B.
TMA_STORE = False


@fast_launch
@triton.jit
def _linears_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, y0_ptr, y1_ptr, y2_ptr,
    M, K, N0, N1, N2, T1, T2, stride_xm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, K_UNROLL: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    # Column tiles [0, T1) are w0's, [T1, T2) w1's, [T2, ...) w2's (contiguous [N_i, K] weights,
    # contiguous [M, N_i] outputs).
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    tile_m = pid % n_tiles_m
    tile_n = pid // n_tiles_m
    in1 = tile_n >= T1
    in2 = tile_n >= T2
    w_ptr = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w0_ptr))
    y_ptr = tl.where(in2, y2_ptr, tl.where(in1, y1_ptr, y0_ptr))
    N = tl.where(in2, N2, tl.where(in1, N1, N0))
    tile_n -= tl.where(in2, T2, tl.where(in1, T1, 0))
    b_ptr = tl.where(in2, b2_ptr, tl.where(in1, b1_ptr, b0_ptr))
    _linear_tile(x_ptr, w_ptr, b_ptr, y_ptr, tile_m, tile_n, M, N, K, stride_xm, K, N,
                    HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, K_UNROLL, USE_GDC)


@triton.jit
def _tma_segment(x_desc, w_desc, b_ptr, y, lo, hi, end, n_tiles_m, M, N, K,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr, USE_GDC: tl.constexpr,
                 TMA_STORE: tl.constexpr):
    """This program's tiles of one weight: global tiles [lo, hi) that are its own (tile = program
    mod NUM_PROGRAMS), row tiles fastest. `end`: the last weight's hi (USE_GDC: the release after
    the program's last K walk of all). y: the output's pointer, or its descriptor with TMA_STORE."""
    first = lo + (tl.program_id(0) - lo % NUM_PROGRAMS + NUM_PROGRAMS) % NUM_PROGRAMS
    for tile in tl.range(first, hi, NUM_PROGRAMS, flatten=True):
        tile_m = (tile - lo) % n_tiles_m
        tile_n = (tile - lo) // n_tiles_m
        acc = _tma_k_walk(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                          PRECISION)
        release_after_last(tile, end, NUM_PROGRAMS, USE_GDC)
        if TMA_STORE:
            _tma_bias_store(acc, y, b_ptr, tile_m * BLOCK_M, tile_n * BLOCK_N, N, HAS_BIAS, BLOCK_N)
        else:
            rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _bias_store(acc, b_ptr, y, rows, cols, M, N, N, HAS_BIAS)


@fast_launch
@triton.jit
def _linears_tma_kernel(
    x_desc, w0_desc, w1_desc, w2_desc, b0_ptr, b1_ptr, b2_ptr, y0, y1, y2,
    M, K, N0, N1, N2, T1, T2, T3,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr, USE_GDC: tl.constexpr = False,
    TMA_STORE: tl.constexpr = False,
):
    # Persistent: the tiles of w0, then w1's, then w2's ([0, T1), [T1, T2), [T2, T3) of one tile
    # sequence), dealt round robin over the programs; a weight's tiles in one pipelined loop.
    # USE_GDC (PDL, gdc.py; launch.PDL_TMA): the wait first, the release after the last K walk.
    # y0-y2: the outputs' pointers, or with TMA_STORE their descriptors (TMA_STORE above).
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    gdc_wait(USE_GDC)
    _tma_segment(x_desc, w0_desc, b0_ptr, y0, 0, T1, T3, n_tiles_m, M, N0, K, HAS_BIAS, BLOCK_M, BLOCK_N,
                 BLOCK_K, PRECISION, NUM_PROGRAMS, USE_GDC, TMA_STORE)
    _tma_segment(x_desc, w1_desc, b1_ptr, y1, T1, T2, T3, n_tiles_m, M, N1, K, HAS_BIAS, BLOCK_M, BLOCK_N,
                 BLOCK_K, PRECISION, NUM_PROGRAMS, USE_GDC, TMA_STORE)
    _tma_segment(x_desc, w2_desc, b2_ptr, y2, T2, T3, T3, n_tiles_m, M, N2, K, HAS_BIAS, BLOCK_M, BLOCK_N,
                 BLOCK_K, PRECISION, NUM_PROGRAMS, USE_GDC, TMA_STORE)


def _by_tma(t: mm.Tile, *ts: torch.Tensor) -> bool:
    return t.tma and SMALL_M_TMA and mm._tma_ok(*ts)


def linears(x_MK: torch.Tensor, ws: tuple[torch.Tensor, ...], bs: tuple[torch.Tensor, ...] | None = None
            ) -> tuple[torch.Tensor, ...]:
    """(linear(x, ws[i], bs[i]) for each i), bit for bit; 1-3 weights of one K (q/k/v, gate/up).

    At M <= SMALL_M (decode) one launch covers them all, its tile chosen by the summed N (the
    decode step's few, small linears are launch- and occupancy-bound); above, one linear each.
    """
    M, K = x_MK.shape
    if not 1 <= len(ws) <= 3 or any(w.shape[1] != K for w in ws) or (bs is not None and len(bs) != len(ws)):
        raise ValueError(f"miles_kernels linears: 1-3 weights [N_i, K={K}] (and as many biases), got "
                         f"{[list(w.shape) for w in ws]} and {None if bs is None else len(bs)} biases")
    small = mm.SMALL_M_TILES.get(x_MK.dtype, ())
    if M == 0 or M > mm.SMALL_M or not small:
        return tuple(mm.linear(x_MK, w, None if bs is None else bs[i]) for i, w in enumerate(ws))
    x_MK = x_MK.contiguous()
    ws = tuple(w.contiguous() for w in ws)
    ns = [w.shape[0] for w in ws]
    t = mm.linear_tile(M, x_MK.dtype, sum(ns), x_MK.device)
    ys = tuple(torch.empty((M, n), dtype=x_MK.dtype, device=x_MK.device) for n in ns)
    tiles = [triton.cdiv(n, t.block_n) for n in ns] + [0, 0]
    pad = lambda seq, fill: tuple(seq) + (fill,) * (3 - len(seq))  # noqa: E731
    y3 = pad(ys, ys[-1])
    b3 = pad(bs, bs[-1]) if bs is not None else (x_MK,) * 3
    n3 = pad(ns, 0)
    consts = dict(HAS_BIAS=bs is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                  PRECISION=mm._dot_precision(x_MK.dtype), num_warps=t.num_warps, num_stages=t.num_stages)
    n_tiles_m = triton.cdiv(M, t.block_m)
    if min(ns) > 0 and _by_tma(t, x_MK, *ws):
        total = n_tiles_m * sum(tiles)
        n_prog = min(mm._num_programs(x_MK.device), total)
        wd = [TensorDescriptor.from_tensor(w, [t.block_n, t.block_k]) for w in ws]
        ends = [n_tiles_m * sum(tiles[:i + 1]) for i in range(3)]
        store = TMA_STORE and mm._tma_ok(*ys)
        if store:
            yd = [TensorDescriptor.from_tensor(y, [t.block_m, t.block_n]) for y in ys]
            y3 = pad(yd, yd[-1])
        _linears_tma_kernel[(n_prog,)](
            TensorDescriptor.from_tensor(x_MK, [t.block_m, t.block_k]), *pad(wd, wd[-1]), *b3, *y3, M, K, *n3, *ends,
            NUM_PROGRAMS=n_prog, USE_GDC=launch.PDL_TMA and x_MK.is_cuda, TMA_STORE=store, **consts)
        return ys
    _linears_kernel[(n_tiles_m * sum(tiles),)](
        x_MK, *pad(ws, ws[-1]), *b3, *y3, M, K, *n3, tiles[0], tiles[0] + tiles[1], x_MK.stride(0),
        K_UNROLL=t.k_unroll, USE_GDC=launch.gdc_rows(x_MK, M), **consts)
    return ys


@fast_launch
@triton.jit
def _swiglu_kernel(x_ptr, wg_ptr, wu_ptr, y_ptr, M, F, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, K_UNROLL: tl.constexpr,
                   USE_GDC: tl.constexpr = False):
    # One tile of silu(x @ wg^T) * (x @ wu^T) (contiguous [F, K] weights, contiguous [M, F] y):
    # each product walks K as linear's tile does (from 0 in BLOCK_K steps, fp32 acc) and is
    # rounded to y's dtype as linear stores it, then silu_mul's fp32 math and its one rounding.
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    rows = (pid % n_tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // n_tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    prefetch_rows(wg_ptr, cols, F, K, K, 256, USE_GDC)  # PDL (gdc.py): weights asked of L2, then the wait
    prefetch_rows(wu_ptr, cols, F, K, K, 256, USE_GDC)
    gdc_wait(USE_GDC)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < F
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_off = cols[None, :].to(tl.int64) * K + ks[:, None]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_rest = 0
    if K_UNROLL > 1:  # whole steps K_UNROLL an iteration, then the rest: the same dots (as _k_walk)
        k_rest = K - K % (BLOCK_K * K_UNROLL)
        for k0 in range(0, k_rest, BLOCK_K * K_UNROLL):
            for u in tl.static_range(K_UNROLL):
                x = tl.load(x_ptrs + u * BLOCK_K, mask=row_ok[:, None], other=0.0)
                acc_g = tl.dot(x, tl.load(wg_ptr + w_off + u * BLOCK_K, mask=col_ok[None, :], other=0.0), acc_g,
                               input_precision=PRECISION)
                acc_u = tl.dot(x, tl.load(wu_ptr + w_off + u * BLOCK_K, mask=col_ok[None, :], other=0.0), acc_u,
                               input_precision=PRECISION)
            x_ptrs += BLOCK_K * K_UNROLL
            w_off += BLOCK_K * K_UNROLL
    for k0 in range(k_rest, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None] & (k0 + ks[None, :] < K), other=0.0)
        w_ok = col_ok[None, :] & (k0 + ks[:, None] < K)
        acc_g = tl.dot(x, tl.load(wg_ptr + w_off, mask=w_ok, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, tl.load(wu_ptr + w_off, mask=w_ok, other=0.0), acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_off += BLOCK_K
    gdc_release(USE_GDC)
    dtype = y_ptr.dtype.element_ty
    y = silu_times(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32))
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * F + cols[None, :]
    tl.store(y_ptrs, y.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


@fast_launch
@triton.jit
def _swiglu_tma_kernel(x_desc, wg_desc, wu_desc, y_desc, M, F, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                       USE_GDC: tl.constexpr = False):
    # _swiglu_kernel's tiles by TMA in a persistent grid (program p: tiles p, p + NUM_PROGRAMS, ...,
    # row tiles fastest); the same dots in the same order, the same epilogue. The store is clipped.
    # Not flattened: flattened, ptxas (triton 3.6, sm_90) serialized the two accumulators' wgmmas (C7515).
    # USE_GDC (PDL, gdc.py; launch.PDL_TMA): the wait first, the release after the program's last K walk.
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles = n_tiles_m * tl.cdiv(F, BLOCK_N)
    gdc_wait(USE_GDC)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_PROGRAMS, flatten=False):
        off_m = (tile % n_tiles_m) * BLOCK_M
        off_n = (tile // n_tiles_m) * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            acc_g = tl.dot(x, wg_desc.load([off_n, k0]).T, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, wu_desc.load([off_n, k0]).T, acc_u, input_precision=PRECISION)
        release_after_last(tile, n_tiles, NUM_PROGRAMS, USE_GDC)
        _swiglu_store(acc_g, acc_u, y_desc, off_m, off_n)


@triton.jit
def _swiglu_store(acc_g, acc_u, y_desc, off_m, off_n):
    """Each product rounded to y's dtype as linear stores it, silu_mul's fp32 math, one rounding; by TMA."""
    dtype = y_desc.dtype
    y = silu_times(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32))
    y_desc.store([off_m, off_n], y.to(dtype))


@triton.jit
def _swiglu_k_range(x_desc, wg_desc, wu_desc, off_m, off_n, k_lo, k_hi, acc_g, acc_u, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """K-steps [k_lo, k_hi) of both products of the tile at (off_m, off_n): _swiglu_tma_kernel's dots."""
    for ki in range(k_lo, k_hi):
        x = x_desc.load([off_m, ki * BLOCK_K])
        acc_g = tl.dot(x, wg_desc.load([off_n, ki * BLOCK_K]).T, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, wu_desc.load([off_n, ki * BLOCK_K]).T, acc_u, input_precision=PRECISION)
    return acc_g, acc_u


@fast_launch
@triton.jit
def _swiglu_streamk_kernel(x_desc, wg_desc, wu_desc, y_desc, ws_ptr, flag_ptr, M, F, K, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                           NUM_PROGRAMS: tl.constexpr, SLOT: tl.constexpr, USE_GDC: tl.constexpr = False):
    # _swiglu_tma_kernel's tiles in stream-K order (streamk.py): the head piece's two accumulators parked as
    # the slot's parts 0 and 1, the whole tiles, the tail resumed from both. Loops not flattened (C7515, above).
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_ki = tl.cdiv(K, BLOCK_K)
    head, kb, first, end, tail, ka = streamk.split(tl.program_id(0), n_tiles_m * tl.cdiv(F, BLOCK_N), n_ki,
                                                   NUM_PROGRAMS)
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    slot_g, slot_u = streamk.slots(ws_ptr, 0, BLOCK_M, BLOCK_N), streamk.slots(ws_ptr, 1, BLOCK_M, BLOCK_N)
    gdc_wait(USE_GDC)
    if kb != 0:
        acc_g, acc_u = _swiglu_k_range(x_desc, wg_desc, wu_desc, (head % n_tiles_m) * BLOCK_M,
                                       (head // n_tiles_m) * BLOCK_N, 0, kb, zero, zero, BLOCK_K, PRECISION)
        streamk.park(acc_g, slot_g, SLOT)
        streamk.park(acc_u, slot_u, SLOT)
        streamk.publish(flag_ptr)
    for tile in tl.range(first, end, flatten=False):
        off_m = (tile % n_tiles_m) * BLOCK_M
        off_n = (tile // n_tiles_m) * BLOCK_N
        acc_g, acc_u = _swiglu_k_range(x_desc, wg_desc, wu_desc, off_m, off_n, 0, n_ki, zero, zero, BLOCK_K,
                                       PRECISION)
        if (ka == 0) & (tile == end - 1):
            gdc_release(USE_GDC)
        _swiglu_store(acc_g, acc_u, y_desc, off_m, off_n)
    if ka != 0:
        streamk.await_head(flag_ptr)
        acc_g = streamk.resume(slot_g, SLOT)
        acc_u = streamk.resume(slot_u, SLOT)
        streamk.clear(flag_ptr)
        off_m = (tail % n_tiles_m) * BLOCK_M
        off_n = (tail // n_tiles_m) * BLOCK_N
        acc_g, acc_u = _swiglu_k_range(x_desc, wg_desc, wu_desc, off_m, off_n, ka, n_ki, acc_g, acc_u, BLOCK_K,
                                       PRECISION)
        gdc_release(USE_GDC)
        _swiglu_store(acc_g, acc_u, y_desc, off_m, off_n)


def swiglu(x_MK: torch.Tensor, w_gate_FK: torch.Tensor, w_up_FK: torch.Tensor) -> torch.Tensor:
    """silu_mul(linear(x, w_gate), linear(x, w_up)) bit for bit in one launch, for M <= SMALL_M
    (decode): the gate and up products never leave the kernel. The tile is linears' for the
    two weights (N = 2F) with half its width a weight: each program walks both weights' rows of
    its columns, the weight bytes and registers of linears' tile."""
    M, K = x_MK.shape
    F = w_gate_FK.shape[0]
    if w_gate_FK.shape != (F, K) or w_up_FK.shape != (F, K):
        raise ValueError(f"miles_kernels swiglu: gate {list(w_gate_FK.shape)} and up {list(w_up_FK.shape)} must "
                         f"both be [F, K={K}]")
    if M > mm.SMALL_M or x_MK.dtype not in mm.SMALL_M_TILES:
        raise ValueError(f"miles_kernels swiglu: one kernel for M <= {mm.SMALL_M} rows of bf16/fp16 "
                         f"(got M={M}, {x_MK.dtype}); above, silu_mul(*linears(...))")
    x_MK, w_gate_FK, w_up_FK = x_MK.contiguous(), w_gate_FK.contiguous(), w_up_FK.contiguous()
    y = torch.empty((M, F), dtype=x_MK.dtype, device=x_MK.device)
    if M == 0 or F == 0:
        return y
    t = mm.linear_tile(M, x_MK.dtype, 2 * F, x_MK.device)
    block_n = max(t.block_n // 2, 16)
    consts = dict(BLOCK_M=t.block_m, BLOCK_N=block_n, BLOCK_K=t.block_k, PRECISION=mm._dot_precision(x_MK.dtype),
                  num_warps=t.num_warps, num_stages=t.num_stages)
    n_tiles = triton.cdiv(M, t.block_m) * triton.cdiv(F, block_n)
    if _by_tma(t, x_MK, w_gate_FK, w_up_FK, y):
        n_prog = min(mm._num_programs(x_MK.device), n_tiles)
        descs = (TensorDescriptor.from_tensor(x_MK, [t.block_m, t.block_k]),
                 TensorDescriptor.from_tensor(w_gate_FK, [block_n, t.block_k]),
                 TensorDescriptor.from_tensor(w_up_FK, [block_n, t.block_k]),
                 TensorDescriptor.from_tensor(y, [t.block_m, block_n]))
        gdc = launch.PDL_TMA and x_MK.is_cuda
        ws = streamk.takes(n_tiles, n_prog, K) and streamk.workspace(x_MK.device, n_prog, 2 * t.block_m * block_n)
        if ws:
            _swiglu_streamk_kernel[(n_prog,)](*descs, *ws, M, F, K, NUM_PROGRAMS=n_prog, SLOT=streamk.SLOT,
                                              USE_GDC=gdc, **consts)
        else:
            _swiglu_tma_kernel[(n_prog,)](*descs, M, F, K, NUM_PROGRAMS=n_prog, USE_GDC=gdc, **consts)
        return y
    _swiglu_kernel[(n_tiles,)](x_MK, w_gate_FK, w_up_FK, y, M, F, K, x_MK.stride(0), K_UNROLL=t.k_unroll,
                               USE_GDC=launch.gdc_rows(x_MK, M), **consts)
    return y
