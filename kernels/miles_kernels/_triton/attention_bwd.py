"""Backward of the packed causal GQA training attention (FlashAttention-2's split).

Inputs are the forward's: q [T, H, D], k/v [T, K, D] (whole sequences packed at cu_seqlens),
its output o and each row's log-sum-exp of the scaled scores (natural log, [H, T]:
paged_attention's lse_HT), and dout. With P = softmax(scale * q k^T) recomputed from the LSE:

    delta = rowsum(o * dout)                    _delta_kernel: one program per (token block, head)
    dV = P^T dout, dK = scale * dS^T q          _dkdv_kernel: one program per (KV block, kv head),
                                                looping over its G query heads and the query
                                                blocks at or after the KV block (causal)
    dQ = scale * dS k                           _dq_kernel: one program per (Q block, query head),
                                                looping over the KV blocks up to the diagonal
    with dS = P * (dout v^T - delta)

Each program owns its output rows and keeps them in fp32 registers: no atomics, no partial
sums. Scores run in log2 units (log2(e) folded into the scale and the LSE, exp2). Only the
blocks that cross the diagonal or a sequence's end are masked; a sequence's blocks start at
its first token. Not batch-invariant (need not be): deterministic, one order per launch shape.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from miles_kernels._triton.attn_parts import tma_descriptors
from miles_kernels._triton.gluon_gate import gluon_module
from miles_kernels._triton.launch import fast_launch

_LOG2E = tl.constexpr(1.4426950408889634)


class Tile(NamedTuple):
    block_m: int  # query rows: per step of a dK/dV program, per dQ program
    block_n: int  # keys: per dK/dV program, per step of a dQ program
    num_warps: int
    num_stages: int


# Per dtype: the tile for a full GPU, then the one for grids below FILL programs. Causal work
# is uneven (KV block 0 meets every query block, the last one a single block), so below ~2
# programs per SM the longest program sets the time and a smaller tile (more, shorter
# programs) finishes first. fp32 is the interpreter's (CPU). From the H200 sweep of
# 2026-12-02 (tools/bench/attn_bwd.py --sweep, docs/kernel_tuning.md): dK/dV at 64 keys x 64
# query rows and 4 warps was 1.0-1.5x flash's whole backward where the first picks (32 x 128,
# 8 warps, from sm_90 spill counts) were 0.72-1.06x; dQ at 3 stages +3-7% over 2.
DKDV_TILES = {torch.bfloat16: (Tile(64, 64, 4, 2), Tile(32, 64, 4, 3)),
              torch.float16: (Tile(64, 64, 4, 2), Tile(32, 64, 4, 3)),
              torch.float32: (Tile(16, 16, 4, 1),)}
DQ_TILES = {torch.bfloat16: (Tile(128, 64, 8, 3), Tile(64, 64, 4, 2)),
            torch.float16: (Tile(128, 64, 8, 3), Tile(64, 64, 4, 2)),
            torch.float32: (Tile(16, 16, 4, 1),)}
FILL = 264  # 2 programs per SM of an H100/H200
# The dK/dV kernel reads q and dout, the dQ kernel k and v, by TMA descriptors (aligned rows; on
# CUDA 16-bit dtypes): the same values. dK/dV: the backward 2-8% faster (attn_bwd.py --tma,
# 2026-12-03 fifteenth run); dQ: 0-3% more (0.6B 16k 6,788 -> 6,640 us; sixteenth run).
DKDV_TMA = True
DQ_TMA = True
_DELTA_ROWS = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 16}  # tokens per delta program
# dK/dV and dQ by gluon_attention_bwd's kernels on Hopper (the same values; dK/dV where the
# full-GPU tile, whose query block it shares, is picked): dK/dV 1.13-1.23x _dkdv_kernel, dQ
# 1.14-1.27x _dq_kernel at 0.6B 4k / 16k / packed (tools/bench/gluon_dkdv.py, gluon_dq.py,
# 2026-12-04 twenty-second run).
GLUON_DKDV = True
GLUON_DQ = True


@fast_launch
@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, T, stride_t, stride_dh, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * dout[t, h, d] in fp32."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.arange(0, D)
    ok = t < T
    off = t.to(tl.int64)[:, None] * stride_t + h * D + ds[None, :]
    o = tl.load(o_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + h * stride_dh + t, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, m0, kpos, q_len, qk_scale, stride_t, row0, col,
               BLOCK_M: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr,
               TMA: tl.constexpr):
    """Add query rows m0 .. m0 + BLOCK_M of one head to the KV block's dk, dv (pointers at the
    sequence's first token and the head; with TMA q_ptr/do_ptr are [T, H * D] descriptors and
    the sequence's first token and the head's column are row0, col). MASK: the causal and
    sequence-end masks."""
    qpos = m0 + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, D)
    off = qpos[:, None] * stride_t + ds[None, :]
    ok = qpos < q_len
    if TMA:
        q = q_ptr.load([row0 + m0, col])
        do = do_ptr.load([row0 + m0, col])
        if MASK:  # rows past the sequence: zeros, as the pointer loads read them
            q = tl.where(ok[:, None], q, 0.0)
            do = tl.where(ok[:, None], do, 0.0)
    elif MASK:
        q = tl.load(q_ptr + off, mask=ok[:, None], other=0.0)
        do = tl.load(do_ptr + off, mask=ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptr + off)
        do = tl.load(do_ptr + off)
    if MASK:
        lse = tl.load(lse_ptr + qpos, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + qpos, mask=ok, other=0.0)
    else:
        lse = tl.load(lse_ptr + qpos)
        delta = tl.load(delta_ptr + qpos)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
    pT = tl.exp2(sT * qk_scale - lse[None, :] * _LOG2E)
    if MASK:
        pT = tl.where((kpos[:, None] <= qpos[None, :]) & ok[None, :], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = tl.dot(dsT, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _program(per_rank, n_heads, cu_ptr):
    """This program's (rank in launch order, head, sequence's first token, its length): the
    grid runs rank-major over (rank, sequence, head), per_rank = sequences x heads."""
    pid = tl.program_id(0)
    b = (pid % per_rank) // n_heads
    q_lo = tl.load(cu_ptr + b)
    return pid // per_rank, pid % n_heads, q_lo, tl.load(cu_ptr + b + 1) - q_lo


@triton.jit
def _kv_rows(k_ptr, v_ptr, n0, q_lo, q_len, kvh, stride_kt, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A dK/dV program's KV block: its key positions, [BLOCK_N, D] offsets and row mask, k and v."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    kv_off = q_lo.to(tl.int64) * stride_kt + kvh * D + kpos[:, None] * stride_kt + tl.arange(0, D)[None, :]
    k_ok = kpos[:, None] < q_len
    return kpos, kv_off, k_ok, tl.load(k_ptr + kv_off, mask=k_ok, other=0.0), tl.load(v_ptr + kv_off, mask=k_ok,
                                                                                        other=0.0)


@fast_launch
@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_ptr,
                 qk_scale, scale, n_kv_heads, n_bk, stride_qt, stride_kt, stride_lh, stride_dh,
                 G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, TMA: tl.constexpr):
    # KV block j: block 0 (every query block after it) starts first
    j, kvh, q_lo, q_len = _program(n_bk, n_kv_heads, cu_ptr)
    n0 = j * BLOCK_N
    if n0 >= q_len:
        return
    kpos, kv_off, k_ok, k, v = _kv_rows(k_ptr, v_ptr, n0, q_lo, q_len, kvh, stride_kt, D, BLOCK_N)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    i_lo = n0 // BLOCK_M
    i_full = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M)  # query blocks from here on see every key whole
    n_q = tl.cdiv(q_len, BLOCK_M)
    n_q_full = q_len // BLOCK_M  # blocks before this one end inside the sequence
    for g in range(G):
        h = kvh * G + g
        if TMA:
            q_h, do_h = q_ptr, do_ptr
        else:
            q_h = q_ptr + q_lo.to(tl.int64) * stride_qt + h * D
            do_h = do_ptr + q_lo.to(tl.int64) * stride_qt + h * D
        lse_h = lse_ptr + h.to(tl.int64) * stride_lh + q_lo
        delta_h = delta_ptr + h.to(tl.int64) * stride_dh + q_lo
        for i in range(i_lo, tl.minimum(i_full, n_q)):  # the diagonal
            dk, dv = _dkdv_step(dk, dv, k, v, q_h, do_h, lse_h, delta_h, i * BLOCK_M, kpos, q_len, qk_scale,
                                stride_qt, q_lo, h * D, BLOCK_M, D, PRECISION, True, TMA)
        for i in range(i_full, n_q_full):
            dk, dv = _dkdv_step(dk, dv, k, v, q_h, do_h, lse_h, delta_h, i * BLOCK_M, kpos, q_len, qk_scale,
                                stride_qt, q_lo, h * D, BLOCK_M, D, PRECISION, False, TMA)
        for i in range(tl.maximum(i_full, n_q_full), n_q):  # the sequence's last, partial block
            dk, dv = _dkdv_step(dk, dv, k, v, q_h, do_h, lse_h, delta_h, i * BLOCK_M, kpos, q_len, qk_scale,
                                stride_qt, q_lo, h * D, BLOCK_M, D, PRECISION, True, TMA)
    tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_ok)
    tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, qpos, k_ptr, v_ptr, n0, q_len, qk_scale, stride_t, row0, col,
             BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr,
             TMA: tl.constexpr):
    """Add keys n0 .. n0 + BLOCK_N to the Q block's dq (pointers at the sequence's first
    token and the kv head; with TMA k_ptr/v_ptr are [T, K * D] descriptors and the sequence's
    first token and the kv head's column are row0, col). MASK: the causal and sequence-end masks."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, D)
    off = kpos[:, None] * stride_t + ds[None, :]
    if TMA:
        k = k_ptr.load([row0 + n0, col])
        v = v_ptr.load([row0 + n0, col])
        if MASK:  # keys past the sequence: zeros, as the pointer loads read them
            k = tl.where(kpos[:, None] < q_len, k, 0.0)
            v = tl.where(kpos[:, None] < q_len, v, 0.0)
    elif MASK:
        k = tl.load(k_ptr + off, mask=kpos[:, None] < q_len, other=0.0)
        v = tl.load(v_ptr + off, mask=kpos[:, None] < q_len, other=0.0)
    else:
        k = tl.load(k_ptr + off)
        v = tl.load(v_ptr + off)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK:  # keys past the sequence's end sit past every real row: causal covers them
        p = tl.where(kpos[None, :] <= qpos[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds_ = p * (dp - delta[:, None])
    return tl.dot(ds_.to(k.dtype), k, dq, input_precision=PRECISION)


@fast_launch
@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, cu_ptr,
               qk_scale, scale, n_heads, n_bh, n_blocks, stride_qt, stride_kt, stride_lh, stride_dh,
               G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr):
    r, h, q_lo, q_len = _program(n_bh, n_heads, cu_ptr)
    i = n_blocks - 1 - r  # Q block: the last (longest: most KV blocks) start first
    m0 = i * BLOCK_M
    if m0 >= q_len:
        return
    qpos = m0 + tl.arange(0, BLOCK_M)
    ok = qpos < q_len
    ds = tl.arange(0, D)
    q_off = q_lo.to(tl.int64) * stride_qt + h * D + qpos[:, None] * stride_qt + ds[None, :]
    q = tl.load(q_ptr + q_off, mask=ok[:, None], other=0.0)
    do = tl.load(do_ptr + q_off, mask=ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + h.to(tl.int64) * stride_lh + q_lo + qpos, mask=ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + h.to(tl.int64) * stride_dh + q_lo + qpos, mask=ok, other=0.0)
    if TMA:
        k_h, v_h = k_ptr, v_ptr
    else:
        kv_h = q_lo.to(tl.int64) * stride_kt + (h // G) * D
        k_h, v_h = k_ptr + kv_h, v_ptr + kv_h
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    n_full = (m0 + 1) // BLOCK_N  # KV blocks ending at or before the first row: no mask
    n_kv = tl.cdiv(tl.minimum(m0 + BLOCK_M, q_len), BLOCK_N)
    for j in range(0, n_full):
        dq = _dq_step(dq, q, do, lse2, delta, qpos, k_h, v_h, j * BLOCK_N, q_len, qk_scale,
                      stride_kt, q_lo, (h // G) * D, BLOCK_N, D, PRECISION, False, TMA)
    for j in range(n_full, n_kv):
        dq = _dq_step(dq, q, do, lse2, delta, qpos, k_h, v_h, j * BLOCK_N, q_len, qk_scale,
                      stride_kt, q_lo, (h // G) * D, BLOCK_N, D, PRECISION, True, TMA)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=ok[:, None])


def _pick(tiles: tuple[Tile, ...], programs) -> Tile:
    """The first tile whose grid (programs(tile) real programs) fills the GPU, else the last."""
    return next((t for t in tiles if programs(t) >= FILL), tiles[-1])


def packed_attention_bwd(
    q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, out_THD: torch.Tensor, dout_THD: torch.Tensor,
    lse_HT: torch.Tensor, cu_seqlens_B1: torch.Tensor, max_len: int, scale: float,
    dkdv_tile: Tile | None = None, dq_tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of causal attention over the packed sequences, from the forward's output
    and LSE (natural log of the scaled scores, [H, T] with unit stride over T).
    dkdv_tile / dq_tile override the per-dtype tile tables (benchmarks: tools/bench/attn_bwd.py)."""
    T, H, D = q_THD.shape
    K = k_TKD.shape[1]
    dtype = q_THD.dtype
    if k_TKD.shape != (T, K, D) or v_TKD.shape != k_TKD.shape or out_THD.shape != q_THD.shape \
            or dout_THD.shape != q_THD.shape or H % K:
        raise ValueError(f"miles_kernels packed_attention_bwd: q/out/dout {list(q_THD.shape)} must be [T, H, D], "
                         f"k/v {list(k_TKD.shape)}/{list(v_TKD.shape)} [T, K, D] with H % K == 0")
    if dtype not in DKDV_TILES or not all(t.dtype == dtype for t in (k_TKD, v_TKD, out_THD, dout_THD)):
        raise TypeError(f"miles_kernels packed_attention_bwd: q, k, v, out, dout must share one dtype of bf16, "
                        f"fp16, fp32; got {[t.dtype for t in (q_THD, k_TKD, v_TKD, out_THD, dout_THD)]}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"miles_kernels packed_attention_bwd: head dim {D} must be a power of two in [16, 256]")
    if lse_HT.shape != (H, T) or lse_HT.dtype != torch.float32 or lse_HT.stride(1) != 1:
        raise ValueError(f"miles_kernels packed_attention_bwd: lse_HT must be fp32 [H={H}, T={T}] with unit "
                         f"stride over T, got {lse_HT.dtype} {list(lse_HT.shape)}")
    q, k, v, o, do = (t.contiguous() for t in (q_THD, k_TKD, v_TKD, out_THD, dout_THD))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    B = cu_seqlens_B1.shape[0] - 1
    if T == 0 or B == 0:
        return dq, dk.zero_(), dv.zero_()
    cu = cu_seqlens_B1.to(torch.int32).contiguous()
    max_len = max(int(max_len), 1)
    G = H // K
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    rows = _DELTA_ROWS[dtype]
    _delta_kernel[(triton.cdiv(T, rows), H)](o, do, delta, T, H * D, T, D=D, BLOCK_T=rows, num_warps=4)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32: unused by 16-bit dots
    common = (cu, scale * 1.4426950408889634, scale)
    strides = (H * D, K * D, lse_HT.stride(0), T)

    # real programs ~ blocks over all tokens (+ one partial per sequence) x heads; no host sync
    t = dkdv_tile or _pick(DKDV_TILES[dtype], lambda t: triton.cdiv(T, t.block_n) * K)
    n_blocks = triton.cdiv(max_len, t.block_n)
    # TMA: the loop's operands by tensor descriptors over [T, heads * D] (same values, same math)
    q_in, do_in = tma_descriptors((q, do), t.block_m, DKDV_TMA) or (q, do)
    meta = dict(G=G, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PRECISION=precision, TMA=q_in is not q,
                num_warps=t.num_warps, num_stages=t.num_stages)
    gluon = GLUON_DKDV and dkdv_tile is None and t == DKDV_TILES[dtype][0] and q.is_cuda
    ga = gluon_module("gluon_attention_bwd") if gluon else None
    if ga is not None and t.block_m == ga.BLOCK_M and ga.supported(q, k, v, do):  # a step's rows: the same sums
        ga.dkdv(q, k, v, do, dk, dv, lse_HT, delta, cu, max_len, scale)
    else:
        _dkdv_kernel[(n_blocks * B * K,)](q_in, k, v, do_in, dk, dv, lse_HT, delta, *common, K, B * K, *strides,
                                          **meta)
    gq = gluon_module("gluon_attention_bwd") if GLUON_DQ and dq_tile is None and q.is_cuda else None
    if gq is not None and gq.supported(q, k, v, do):
        gq.dq(q, k, v, do, dq, lse_HT, delta, cu, max_len, scale)
        return dq, dk, dv
    t = dq_tile or _pick(DQ_TILES[dtype], lambda t: triton.cdiv(T, t.block_m) * H)
    n_blocks = triton.cdiv(max_len, t.block_m)
    k_in, v_in = tma_descriptors((k, v), t.block_n, DQ_TMA) or (k, v)
    _dq_kernel[(n_blocks * B * H,)](
        q, k_in, v_in, do, dq, lse_HT, delta, *common, H, B * H, n_blocks, *strides,
        G=G, D=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PRECISION=precision, TMA=k_in is not k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dq, dk, dv
