"""Invariant matmuls: linear (x_MK @ w_NK^T + b_N) and grouped_linear (MoE experts).

One output tile walks K from 0 in steps of BLOCK_K, accumulating tl.dot results in fp32
(no split-K, no atomics), so every output element sums its K products in the same order
whatever M is. The tile may change with the shape (LINEAR_TILES by M; SMALL_M_TILES and MID_M_TILES
by how many tiles fill the GPU), but BLOCK_K is the same in every tile of a dtype;
tests/gpu/test_matmul_gpu.py checks every tile against every other bitwise. If a GPU ever
breaks that, collapse the tables to one row. Stream-K (streamk.py; off unless MILES_STREAM_K=1) runs the
persistent TMA kernel's tiles with the K walk of a tile split between two programs handed on through
a workspace, in order, so its bits are the plain launch's (tests/gpu/test_streamk_gpu.py).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_kernels._triton.gdc import gdc_release, gdc_wait, prefetch_rows, release_after_last
from miles_kernels._triton.gluon_gate import gluon_module
from miles_kernels._triton import launch, streamk
from miles_kernels._triton.launch import fast_launch


class Tile(NamedTuple):
    max_m: int  # bucket upper bound on M (rows of x)
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # grouped (swizzled) tile order: GROUP_M row-tiles share a column band in L2
    num_warps: int
    num_stages: int
    tma: bool = False  # TMA descriptors (linear: a persistent grid too; aligned tensors): same bits as pointers
    k_unroll: int = 1  # pointer kernels: BLOCK_K steps a loop iteration (the same dots in the same order)


_BIG = 1 << 62
# Hopper tiles for 16-bit inputs (swept on an H100, docs/kernel_tuning.md); every bucket walks K in
# BLOCK_K=64 steps, so all give the same bits. fp32 (ieee dot, no tf32) gets one modest tile.
_TILES_16 = (
    Tile(64, 64, 32, 64, 1, 4, 8),  # decode: weight-read bound, many column tiles, deep pipeline
    Tile(256, 128, 128, 64, 8, 8, 4, True),
    Tile(2048, 128, 128, 64, 8, 8, 5, True),
    Tile(_BIG, 128, 256, 64, 8, 8, 3, True),  # persistent TMA, grouped order: ~0.93-1.1x cuBLAS at M=4096
)
# M <= SMALL_M (engine decode, short prefill chunks): few row tiles, so the tile's width sets how
# many CTAs stream the weight. Largest first; linear_tile takes the first that makes at least
# FILL x SMs tiles, else the last (H200 sweep of 2026-12-02, docs/kernel_tuning.md: 1.0-2.3x the
# M-bucket tile on the 0.6B / 8B shapes at M = 64-512).
SMALL_M = 512
FILL = 0.7
# The 128-row TMA tiles at 5 stages: up to 0.11 of cuBLAS above 4 stages on 41 of 42 shapes at M 128-512
# (H100, thirty-fifth run, linear_sweep --which stages, graph-timed, cold weights; 128x128 at M 512 x N 24,576
# lost 0.10).
_SMALL_16 = (
    Tile(SMALL_M, 128, 128, 64, 8, 8, 5, True),
    Tile(SMALL_M, 128, 64, 64, 8, 4, 5, True),
    Tile(SMALL_M, 64, 64, 64, 1, 4, 6),
    # Two BLOCK_K steps an iteration on the narrow tiles (same bits): graph-timed with cold weights
    # on an H100 (2026-12-05), 0.6B / 8B decode linears at M 64 went 0.89-0.93x -> 0.92-1.07x cuBLAS,
    # and M 256 N 1024 (64x32) 0.75-0.78x -> 0.95-0.97x; 64x64 stays at one step (u2 no faster).
    Tile(SMALL_M, 64, 32, 64, 1, 4, 6, k_unroll=2),
    Tile(SMALL_M, 64, 16, 64, 1, 4, 8, k_unroll=2),
)
SMALL_M_TILES: dict[torch.dtype, tuple[Tile, ...]] = {torch.bfloat16: _SMALL_16, torch.float16: _SMALL_16}
# M in (SMALL_M, FILL_MAX_M] (chunked prefill, short trainer micro-batches) takes its tile by the fill
# rule over MID_M_TILES, where a tile that makes more than one wave must also fill WAVE_FILL of the
# waves it makes (a 1.45-wave 128x256 grid read 0.78x cuBLAS at M 1,024 x N 6,144 against 128x128's
# 0.95x). Graph-timed with cold weights on an H100 (thirty-fourth run, linear_sweep --which upper), 0.6B /
# 8B shapes: the M bucket's one 128x128 tile read 0.73-0.98x at M 1,024-2,048, these picks 0.88-1.11x.
FILL_MAX_M = 2048
WAVE_FILL = 0.85
_MID_16 = (
    Tile(FILL_MAX_M, 128, 256, 64, 8, 8, 3, True),
    Tile(FILL_MAX_M, 128, 128, 64, 8, 8, 5, True),
    Tile(FILL_MAX_M, 128, 64, 64, 8, 4, 5, True),
)
MID_M_TILES: dict[torch.dtype, tuple[Tile, ...]] = {torch.bfloat16: _MID_16, torch.float16: _MID_16}
LINEAR_TILES: dict[torch.dtype, tuple[Tile, ...]] = {
    torch.bfloat16: _TILES_16,
    torch.float16: _TILES_16,
    torch.float32: (Tile(_BIG, 64, 64, 32, 8, 4, 3),),
}
# grouped_linear: by the mean rows per expert (max_m bounds cdiv(R, E)); every tile of a dtype
# walks K in the same BLOCK_K steps, so all give the same bits (tests/gpu checks each against
# each). H200 sweep of 2026-12-02 (tools/bench/grouped_sweep.py, docs/kernel_tuning.md): decode
# (8-16 rows an expert) wants the 64-row pointer tile, training the persistent 128x256 TMA one.
_GROUPED_16 = (
    Tile(64, 64, 128, 64, 2, 4, 4),
    Tile(_BIG, 128, 256, 64, 2, 8, 3, True),
    Tile(_BIG, 128, 128, 64, 2, 8, 4, True),  # N not a multiple of 256 (e.g. 384: 1.15x the wide tile)
)
GROUPED_TILES: dict[torch.dtype, tuple[Tile, ...]] = {
    torch.bfloat16: _GROUPED_16,
    torch.float16: _GROUPED_16,
    torch.float32: (Tile(_BIG, 32, 64, 32, 1, 4, 3),),
}


def grouped_tile(rows: int, experts: int, dtype: torch.dtype, n: int = 0) -> Tile:
    """grouped_linear's tile for `rows` rows over `experts` experts (of n output columns): the
    first tile of the mean rows' bucket, or a later one of that bucket whose width divides n."""
    mean = triton.cdiv(rows, max(experts, 1))
    tiles = GROUPED_TILES[dtype]
    first = next((t for t in tiles if mean <= t.max_m), tiles[-1])
    bucket = [t for t in tiles if t.max_m == first.max_m]
    return next((t for t in bucket if n and n % t.block_n == 0), first)


_TILE_CACHE: dict[tuple, Tile] = {}


def linear_tile(m: int, dtype: torch.dtype, n: int = 0, device: torch.device | None = None) -> Tile:
    """The tile for an [m, K] x [n, K]^T product (n = 0: the M bucket of LINEAR_TILES alone)."""
    # tables swapped or the fill rule changed: a new key
    key = (m, n, dtype, device, id(LINEAR_TILES.get(dtype)), id(SMALL_M_TILES.get(dtype)), id(MID_M_TILES.get(dtype)),
           FILL, FILL_MAX_M, WAVE_FILL)
    t = _TILE_CACHE.get(key)
    if t is None:
        if len(_TILE_CACHE) > 4096:  # packed trainer batches bring many M: keep the dict small
            _TILE_CACHE.clear()
        t = _TILE_CACHE[key] = _pick_tile(m, dtype, n, device)
    return t


def _pick_tile(m: int, dtype: torch.dtype, n: int, device: torch.device | None) -> Tile:
    if dtype not in LINEAR_TILES:
        raise TypeError(f"miles_kernels linear: dtype {dtype} is not supported on CUDA; use bf16, fp16 or fp32")
    small, mid = SMALL_M_TILES.get(dtype, ()), MID_M_TILES.get(dtype, ())
    if n and small and m <= min(SMALL_M, FILL_MAX_M):  # no half-empty 128-row tiles at M <= 64
        return _fill_pick(m, n, [t for t in small if t.block_m <= max(m, 64)], device, 0.0)
    if n and mid and m <= FILL_MAX_M:
        return _fill_pick(m, n, list(mid), device, WAVE_FILL)
    # The bucket's TMA tiles by TMA at every size: below 4M outputs the pointer kernel used to run them,
    # but at M 1,024 x N 1,024 (0.6B o / down, cold weights) it read 0.51-0.52x cuBLAS graph-timed
    # against TMA's 0.74-0.76x (launched: 0.56-0.63x vs 0.76-0.78x; H100, thirty-third run). Same bits.
    return next(t for t in LINEAR_TILES[dtype] if m <= t.max_m)


def _fill_pick(m: int, n: int, tiles: list[Tile], device: torch.device | None, wave_fill: float) -> Tile:
    """The first (widest) of tiles whose grid fills FILL x SMs, and past one wave wave_fill of the
    waves it makes; else the last."""
    sms = _num_programs(device or torch.device("cuda"))
    for t in tiles:
        grid = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
        if grid >= FILL * sms and (grid <= sms or grid >= wave_fill * triton.cdiv(grid, sms) * sms):
            return t
    return tiles[-1]


def all_linear_tiles(dtype: torch.dtype) -> tuple[Tile, ...]:
    """Every tile linear may pick for dtype (they must all give the same bits)."""
    return LINEAR_TILES[dtype] + SMALL_M_TILES.get(dtype, ()) + MID_M_TILES.get(dtype, ())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must not silently drop to tf32: the invariant path promises fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of `tile` in grouped order: GROUP_M row tiles share a column band
    in L2. The order only changes which tile runs when, never what a tile computes."""
    per_group = GROUP_M * n_tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(n_tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def _k_walk(x_ptrs, w_ptrs, row_ok, col_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, K_UNROLL: tl.constexpr = 1):
    """A tile's x @ w^T: K from 0 in BLOCK_K steps, fp32 accumulation; the one K walk of every
    pointer kernel here (x_ptrs [BLOCK_M, BLOCK_K] at k = 0, w_ptrs the [BLOCK_K, BLOCK_N] view of w^T).
    K_UNROLL > 1: K_UNROLL whole steps an iteration (fewer waits, more bytes in flight a pipeline
    stage), then the rest one at a time: the same dots on the same acc, so the same bits."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_rest = 0
    if K_UNROLL > 1:
        k_rest = K - K % (BLOCK_K * K_UNROLL)
        for k0 in range(0, k_rest, BLOCK_K * K_UNROLL):
            for u in tl.static_range(K_UNROLL):
                x = tl.load(x_ptrs + u * BLOCK_K, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs + u * BLOCK_K, mask=col_ok[None, :], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * K_UNROLL
            w_ptrs += BLOCK_K * K_UNROLL
    for k0 in range(k_rest, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None] & (k0 + ks[None, :] < K), other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :] & (k0 + ks[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _bias_store(acc, b_ptr, y_ptr, rows, cols, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """Round to y's dtype, then + b in fp32 and round again (torch's order, as _cpu.linear), store."""
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y_ptrs, y, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _linear_tile(x_ptr, w_ptr, b_ptr, y_ptr, tile_m, tile_n, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, K_UNROLL: tl.constexpr, USE_GDC: tl.constexpr = False,
                 PREFETCH_K: tl.constexpr = 256):
    """One output tile of y = x @ w^T (+ b) with pointer loads: the K walk, the bias, the store.
    With USE_GDC (gdc.py): the tile's first PREFETCH_K weight columns asked of L2, then the wait for
    the kernel before; the next kernel released once the K walk is done."""
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    prefetch_rows(w_ptr, cols, N, stride_wn, K, PREFETCH_K, USE_GDC)
    gdc_wait(USE_GDC)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = _k_walk(x_ptrs, w_ptrs, rows < M, cols < N, K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, K_UNROLL)
    gdc_release(USE_GDC)
    _bias_store(acc, b_ptr, y_ptr, rows, cols, M, N, stride_ym, HAS_BIAS)


@fast_launch
@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, K_UNROLL: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    tile_m, tile_n = _grouped_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    _linear_tile(x_ptr, w_ptr, b_ptr, y_ptr, tile_m, tile_n, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, K_UNROLL, USE_GDC)


@triton.jit
def _tma_k_walk(x_desc, w_desc, off_m, off_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """_k_walk by TMA: the tile at (off_m, off_n), K from 0 in BLOCK_K steps, fp32 acc. TMA zero-fills
    rows past the end and the K tail as the masked loads do, so the bits are the pointer walk's."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc, input_precision=PRECISION)
    return acc


@fast_launch
@triton.jit
def _linear_tma_kernel(
    x_desc, w_desc, y_desc, b_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    # Persistent: program p computes tiles p, p + NUM_PROGRAMS, ... in grouped order. A tile is
    # computed exactly as in _linear_kernel (K from 0 in BLOCK_K steps, fp32 acc); TMA zero-fills
    # out-of-bounds rows and the K tail as the masked loads do, and clips the store. USE_GDC (PDL,
    # gdc.py; launch.PDL_TMA): the wait before the loop, the release after the program's last K walk.
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    gdc_wait(USE_GDC)
    for tile in tl.range(tl.program_id(0), n_tiles_m * n_tiles_n, NUM_PROGRAMS, flatten=True):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        off_m = tile_m * BLOCK_M
        off_n = tile_n * BLOCK_N
        acc = _tma_k_walk(x_desc, w_desc, off_m, off_n, K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        release_after_last(tile, n_tiles_m * n_tiles_n, NUM_PROGRAMS, USE_GDC)
        _tma_bias_store(acc, y_desc, b_ptr, off_m, off_n, N, HAS_BIAS, BLOCK_N)


@triton.jit
def _tma_bias_store(acc, y_desc, b_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """_bias_store by TMA (the store clipped at the edges): round to y's dtype, + b in fp32, round again."""
    y = acc.to(y_desc.dtype)
    if HAS_BIAS:
        cols = off_n + tl.arange(0, BLOCK_N)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(y_desc.dtype)
    y_desc.store([off_m, off_n], y)


@fast_launch
@triton.jit
def _linear_streamk_kernel(
    x_desc, w_desc, y_desc, b_ptr, ws_ptr, flag_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr, SLOT: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    # _linear_tma_kernel's tiles in stream-K order (streamk.py): this program's head piece, its whole tiles,
    # then its tail piece, resumed from the head the program before parked. Each tile's K-steps from 0 in
    # order on one fp32 acc, so the bits are the plain kernel's. USE_GDC: the wait first, the release after
    # the program's last K walk.
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_ki = tl.cdiv(K, BLOCK_K)
    head, kb, first, end, tail, ka = streamk.split(tl.program_id(0), n_tiles_m * n_tiles_n, n_ki, NUM_PROGRAMS)
    slot = streamk.slots(ws_ptr, 0, BLOCK_M, BLOCK_N)
    gdc_wait(USE_GDC)
    if kb != 0:
        tile_m, tile_n = _grouped_order(head, n_tiles_m, n_tiles_n, GROUP_M)
        acc = streamk.k_range(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, 0, kb,
                              tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K, PRECISION)
        streamk.park(acc, slot, SLOT)
        streamk.publish(flag_ptr)
    for tile in range(first, end):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        acc = streamk.k_range(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, 0, n_ki,
                              tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K, PRECISION)
        if (ka == 0) & (tile == end - 1):
            gdc_release(USE_GDC)
        _tma_bias_store(acc, y_desc, b_ptr, tile_m * BLOCK_M, tile_n * BLOCK_N, N, HAS_BIAS, BLOCK_N)
    if ka != 0:
        streamk.await_head(flag_ptr)
        acc = streamk.resume(slot, SLOT)
        streamk.clear(flag_ptr)
        tile_m, tile_n = _grouped_order(tail, n_tiles_m, n_tiles_n, GROUP_M)
        acc = streamk.k_range(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, ka, n_ki, acc, BLOCK_K, PRECISION)
        gdc_release(USE_GDC)
        _tma_bias_store(acc, y_desc, b_ptr, tile_m * BLOCK_M, tile_n * BLOCK_N, N, HAS_BIAS, BLOCK_N)


_NUM_SMS: dict[int, int] = {}


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, so the persistent loop runs more than once
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _tma_ok(*ts: torch.Tensor) -> bool:
    # TMA needs 16-byte aligned base and row strides (contiguous 2-D tensors here).
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in ts)


def _launch_linear(x_MK, w_NK, b_N, y_MN, t: Tile) -> None:
    M, K = x_MK.shape
    N = w_NK.shape[0]
    precision = _dot_precision(x_MK.dtype)
    if t.tma and _tma_ok(x_MK, w_NK, y_MN):
        x_d = TensorDescriptor.from_tensor(x_MK, [t.block_m, t.block_k])
        w_d = TensorDescriptor.from_tensor(w_NK, [t.block_n, t.block_k])
        y_d = TensorDescriptor.from_tensor(y_MN, [t.block_m, t.block_n])
        n_tiles = triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n)
        n_prog = min(_num_programs(x_MK.device), n_tiles)
        ws = streamk.takes(n_tiles, n_prog, K) and streamk.workspace(x_MK.device, n_prog, t.block_m * t.block_n)
        if ws:
            _linear_streamk_kernel[(n_prog,)](
                x_d, w_d, y_d, b_N if b_N is not None else y_MN, *ws, M, N, K,
                HAS_BIAS=b_N is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                GROUP_M=t.group_m, PRECISION=precision, NUM_PROGRAMS=n_prog, SLOT=streamk.SLOT,
                USE_GDC=launch.PDL_TMA and x_MK.is_cuda, num_warps=t.num_warps, num_stages=t.num_stages,
            )
            return
        _linear_tma_kernel[(n_prog,)](
            x_d, w_d, y_d, b_N if b_N is not None else y_MN, M, N, K,
            HAS_BIAS=b_N is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            GROUP_M=t.group_m, PRECISION=precision, NUM_PROGRAMS=n_prog, USE_GDC=launch.PDL_TMA and x_MK.is_cuda,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        return
    grid = (triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n),)
    _linear_kernel[grid](
        x_MK, w_NK, b_N if b_N is not None else y_MN, y_MN, M, N, K,
        x_MK.stride(0), w_NK.stride(0), y_MN.stride(0),
        HAS_BIAS=b_N is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        GROUP_M=t.group_m, PRECISION=precision, K_UNROLL=t.k_unroll, USE_GDC=launch.gdc_rows(x_MK, M),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )


def linear(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """y_MN = x_MK @ w_NK^T (+ b_N): fp32 accumulate, rounded to x dtype, then + b_N (torch order)."""
    M, K = x_MK.shape
    N, Kw = w_NK.shape
    if K != Kw:
        raise ValueError(f"miles_kernels linear: x has K={K} but weight has K={Kw} (weight is [N, K])")
    x_MK = x_MK.contiguous()
    w_NK = w_NK.contiguous()
    y_MN = torch.empty((M, N), dtype=x_MK.dtype, device=x_MK.device)
    if M == 0 or N == 0:
        return y_MN
    _launch_linear(x_MK, w_NK, b_N, y_MN, linear_tile(M, x_MK.dtype, N, x_MK.device))
    return y_MN


@triton.jit
def _expert_tile(off_ptr, E, pid_m, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert e, first row, end of e's rows) of row tile pid_m in expert order; e == E past the last."""
    es = tl.arange(0, E_PAD)
    lo_E = tl.load(off_ptr + es, mask=es < E, other=0)
    hi_E = tl.load(off_ptr + es + 1, mask=es < E, other=0)
    tiles_E = (hi_E - lo_E + BLOCK_M - 1) // BLOCK_M
    ends_E = tl.cumsum(tiles_E, 0)
    e = tl.sum((ends_E <= pid_m).to(tl.int32), 0)
    is_e = es == e
    row_lo = tl.sum(tl.where(is_e, lo_E, 0), 0)
    row_hi = tl.sum(tl.where(is_e, hi_E, 0), 0)
    tile_in_e = pid_m - tl.sum(tl.where(is_e, ends_E - tiles_E, 0), 0)
    return e, row_lo + tile_in_e * BLOCK_M, row_hi


@triton.jit
def _store_rows(y_ptr, acc, rows, cols, row_hi, N, stride_yr):
    """Store a grouped tile: only its expert's rows (< row_hi) and columns < N."""
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < row_hi) & (cols[None, :] < N))


@fast_launch
@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, off_ptr, y_ptr, N, K, E, n_tiles_m,
    stride_xr, stride_we, stride_wn, stride_yr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    # Row tile m is the m-th in expert order; an expert with n rows owns cdiv(n, BLOCK_M) of
    # them, so a tile never mixes experts. The tile count is an upper bound known on the host
    # ((cdiv(R, BLOCK_M) + E) x column tiles): no device sync, CUDA-graph safe. Tiles run in
    # grouped order (the column tiles of GROUP_M row tiles together), so x's rows are read from
    # HBM about once however many column tiles there are.
    tile_m, tile_n = _grouped_order(tl.program_id(0), n_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e, off_m, row_hi = _expert_tile(off_ptr, E, tile_m, E_PAD, BLOCK_M)
    if e >= E:
        return
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xr + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = _k_walk(x_ptrs, w_ptrs, rows < row_hi, cols < N, K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    _store_rows(y_ptr, acc, rows, cols, row_hi, N, stride_yr)


@fast_launch
@triton.jit
def _grouped_tma_kernel(
    x_desc, w_desc, off_ptr, y_ptr, N, K, E, n_tiles_m, stride_yr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    # _grouped_kernel with TMA loads (x over [R, K], w over [E * N, K]), persistent: program p
    # takes tiles p, p + NUM_PROGRAMS, ... of the row tiles that hold rows (counted from the
    # offsets, not the host's upper bound n_tiles_m), in the same grouped order, one flat
    # loop so loads of the next tile start during this one's epilogue. A tile's rows past its
    # expert (and columns past N) load the neighbour's data and are never stored; the K walk
    # and the fp32 accumulation are _grouped_kernel's, so every stored element has its bits.
    es = tl.arange(0, E_PAD)
    rows_E = tl.load(off_ptr + es + 1, mask=es < E, other=0) - tl.load(off_ptr + es, mask=es < E, other=0)
    n_real_m = tl.minimum(tl.sum((rows_E + BLOCK_M - 1) // BLOCK_M, 0), n_tiles_m)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_real_m * n_tiles_n, NUM_PROGRAMS, flatten=True):
        tile_m, tile_n = _grouped_order(tile, n_real_m, n_tiles_n, GROUP_M)
        e, off_m, row_hi = _expert_tile(off_ptr, E, tile_m, E_PAD, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            w = w_desc.load([e * N + tile_n * BLOCK_N, k0])
            acc = tl.dot(x, w.T, acc, input_precision=PRECISION)
        _store_rows(y_ptr, acc, off_m + tl.arange(0, BLOCK_M), tile_n * BLOCK_N + tl.arange(0, BLOCK_N), row_hi, N,
                    stride_yr)


def grouped_linear(x_RK: torch.Tensor, w_ENK: torch.Tensor, group_offsets_E1: torch.Tensor) -> torch.Tensor:
    """y_RN[r] = x_RK[r] @ w_ENK[e]^T for rows r in [offsets[e], offsets[e+1]); rows sorted by expert."""
    R, K = x_RK.shape
    E, N, Kw = w_ENK.shape
    if K != Kw:
        raise ValueError(f"miles_kernels grouped_linear: x has K={K} but experts have K={Kw} (weights are [E, N, K])")
    if group_offsets_E1.shape != (E + 1,):
        raise ValueError(
            f"miles_kernels grouped_linear: group_offsets must have shape [E+1]=[{E + 1}], got {list(group_offsets_E1.shape)}"
        )
    if x_RK.dtype not in GROUPED_TILES:
        raise TypeError(f"miles_kernels grouped_linear: dtype {x_RK.dtype} is not supported; use bf16, fp16 or fp32")
    x_RK = x_RK.contiguous()
    w_ENK = w_ENK.contiguous()
    offsets = group_offsets_E1.to(torch.int32).contiguous()
    y_RN = torch.empty((R, N), dtype=x_RK.dtype, device=x_RK.device)
    if R == 0 or N == 0:
        return y_RN
    # rows outside [offsets[0], offsets[E]) are zero rather than uninitialised (a MoE covers all)
    _zero_outside_kernel[(triton.cdiv(R, _ZERO_ROWS),)](y_RN, offsets, R, N, E, y_RN.stride(0), ROWS=_ZERO_ROWS,
                                                          BLOCK_N=min(256, triton.next_power_of_2(N)))
    launch_grouped(x_RK, w_ENK, offsets, y_RN, grouped_tile(R, E, x_RK.dtype, N))
    return y_RN


_ZERO_ROWS = 64


@fast_launch
@triton.jit
def _zero_outside_kernel(y_ptr, off_ptr, R, N, E, stride_yr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zero y's rows outside [offsets[0], offsets[E]); a program whose rows are all inside stores nothing."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    outside = ((rows < tl.load(off_ptr)) | (rows >= tl.load(off_ptr + E))) & (rows < R)
    if tl.sum(outside.to(tl.int32), 0) > 0:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :]
            tl.store(ptrs, tl.zeros((ROWS, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                     mask=outside[:, None] & (cols[None, :] < N))


# grouped_linear's TMA tiles by gluon_grouped's kernel on Hopper (a producer warp, two consumer
# warpgroups sharing each w tile, no wgmma for a tile's half past its expert's rows; the same bits).
# Off: no faster than the Triton tile (30B-A3B gate_up 410-430 vs 400 us, down 229 vs 244-249 us;
# the MoE bench 44.8k vs 45.1k tok/s; H200, 2026-12-05).
GLUON_GROUPED = False


def launch_grouped(x_RK, w_ENK, offsets_E1, y_RN, t: Tile) -> None:
    """grouped_linear's kernel for tile t into y_RN (rows outside the groups untouched)."""
    R, K = x_RK.shape
    E, N, _ = w_ENK.shape
    n_tiles_m = triton.cdiv(R, t.block_m) + E  # an upper bound on the row tiles in expert order
    n_tiles = n_tiles_m * triton.cdiv(N, t.block_n)
    meta = dict(E_PAD=triton.next_power_of_2(E), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                GROUP_M=t.group_m, PRECISION=_dot_precision(x_RK.dtype), num_warps=t.num_warps,
                num_stages=t.num_stages)
    if t.tma and _tma_ok(x_RK, w_ENK):
        n_prog = min(_num_programs(x_RK.device), n_tiles)
        gg = gluon_module("gluon_grouped") if GLUON_GROUPED and x_RK.is_cuda else None
        if gg is not None and gg.supported(x_RK, w_ENK, t.block_m, t.block_n, t.block_k):
            gg.launch(x_RK, w_ENK, offsets_E1, y_RN, t.block_n, t.group_m, n_tiles_m, n_prog)
            return
        _grouped_tma_kernel[(n_prog,)](
            TensorDescriptor.from_tensor(x_RK, [t.block_m, t.block_k]),
            TensorDescriptor.from_tensor(w_ENK.view(E * N, K), [t.block_n, t.block_k]), offsets_E1, y_RN,
            N, K, E, n_tiles_m, y_RN.stride(0), NUM_PROGRAMS=n_prog, **meta,
        )
        return
    _grouped_kernel[(n_tiles,)](
        x_RK, w_ENK, offsets_E1, y_RN, N, K, E, n_tiles_m,
        x_RK.stride(0), w_ENK.stride(0), w_ENK.stride(1), y_RN.stride(0), **meta,
    )
