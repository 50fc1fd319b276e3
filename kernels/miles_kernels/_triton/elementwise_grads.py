"""Backward kernels of the row-local ops (rms_norm, apply_rope, silu_mul): one launch each.

The math is that of the torch rules in miles_kernels/_grads.py (fp32 inside, one rounding
per output). The backward need not be batch-invariant, but it is deterministic: rms_norm's
weight grad sums per-program fp32 partials over a fixed partition of the rows (no atomics),
then one torch sum over the partials.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.elementwise import _SILU_BLOCK, rotate
from miles_kernels._triton.launch import fast_launch

_GW_PARTIAL = 1 << 20
"""fp32 elements of rms_norm's weight-grad partials ([programs, D]) to aim for: sets rows per program."""
AHEAD_ELEMENTS = 512
"""Row elements whose loads a program of _rms_norm_grad_kernel issues together: 4 rows of the q/k
norms' 128 (one warp a row: its loads' latency is the kernel's time; q norm 83.8 -> 73.8 us a call
on the H200, same bits), 1 of a 1,024-wide hidden row (4 warps already keep its bytes moving; 4 rows
there took 141 registers, not 64, on sm_90). run_rl at scale passes with it (H200, 2026-12-05)."""


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@fast_launch
@triton.jit
def _rms_norm_grad_kernel(
    x_ptr, w_ptr, g_ptr, add_ptr, gx_ptr, gw_ptr, M, D, rows, stride_x, stride_g, stride_add, stride_gx, eps,
    BLOCK_D: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr, HAS_ADD: tl.constexpr, AHEAD: tl.constexpr,
):
    """Program p: rows p * rows .. (p + 1) * rows - 1, one at a time (gw's partial in row order),
    AHEAD rows' loads issued before the first of them is computed: a row's loads after an earlier
    row's stores wait for those (the compiler cannot rule out aliasing), so one row at a time
    leaves the loads' latency exposed. A row's bits do not depend on AHEAD."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    gw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid * rows
    end = tl.minimum(first + rows, M)
    for base in range(first, end, AHEAD):
        xs, gs, adds = (), (), ()
        for i in tl.static_range(AHEAD):
            row = tl.minimum(base + i, end - 1)  # past the program's rows: its last again, unused
            xs = xs + (tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0),)
            gs = gs + (tl.load(g_ptr + row * stride_g + cols, mask=in_row, other=0.0),)
            if HAS_ADD:
                adds = adds + (tl.load(add_ptr + row * stride_add + cols, mask=in_row, other=0.0),)
        for i in tl.static_range(AHEAD):
            row = base + i
            if row < end:
                x = xs[i].to(tl.float32)
                g = gs[i].to(tl.float32)
                r = tl.rsqrt(tl.sum(x * x, 0) / D + eps)  # the forward kernel's formulation
                xhat = x * r
                if NEED_W:
                    gw += g * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
                if NEED_X:
                    ga = g * w
                    gx = (r * (ga - xhat * (tl.sum(ga * xhat, 0) / D))).to(gx_ptr.dtype.element_ty)
                    if HAS_ADD:  # torch's gx + add after gx's rounding: the fp32 sum, one rounding
                        gx = (gx.to(tl.float32) + adds[i].to(tl.float32)).to(gx_ptr.dtype.element_ty)
                    tl.store(gx_ptr + row * stride_gx + cols, gx, mask=in_row)
    if NEED_W:
        tl.store(gw_ptr + pid * D + cols, gw, mask=in_row)


def rms_norm_grad(x_MD: torch.Tensor, w_D: torch.Tensor, g_MD: torch.Tensor, eps: float,
                  need_x: bool, need_w: bool, add_MD: torch.Tensor | None = None):
    """(gx in x's dtype or None, gw in w's dtype or None) of y = rms_norm(x, w, eps), 2-D x.
    add_MD (x's dtype and shape): gx + add_MD in the same pass, as torch adds it to gx (a
    residual's other grad: add_rms_norm's h), bit for bit."""
    M, D = x_MD.shape
    x_MD, g_MD = _unit_stride(x_MD), _unit_stride(g_MD)
    has_add = add_MD is not None and need_x
    if has_add and (add_MD.dtype != x_MD.dtype or add_MD.shape != x_MD.shape):
        raise ValueError(f"rms_norm_grad: add_MD {add_MD.dtype} {list(add_MD.shape)} must be x's "
                         f"{x_MD.dtype} {list(x_MD.shape)}")
    add_MD = _unit_stride(add_MD) if has_add else x_MD  # unused pointer where no add
    gx = torch.empty((M, D), dtype=x_MD.dtype, device=x_MD.device) if need_x else None
    if M == 0 or not (need_x or need_w):
        return gx, torch.zeros(D, dtype=w_D.dtype, device=w_D.device) if need_w else None
    block_d = triton.next_power_of_2(D)
    rows = triton.cdiv(M, max(1, _GW_PARTIAL // block_d)) if need_w else 1
    n_programs = triton.cdiv(M, rows)
    part_PD = torch.empty((n_programs, D), dtype=torch.float32, device=x_MD.device) if need_w else None
    _rms_norm_grad_kernel[(n_programs,)](
        x_MD, w_D.contiguous(), g_MD, add_MD, gx if need_x else x_MD, part_PD if need_w else x_MD,
        M, D, rows, x_MD.stride(0), g_MD.stride(0), add_MD.stride(0), D, eps,
        BLOCK_D=block_d, NEED_X=need_x, NEED_W=need_w, HAS_ADD=has_add,
        AHEAD=max(1, min(rows, AHEAD_ELEMENTS // block_d)),
        num_warps=max(1, min(16, block_d // 256)),
    )
    return gx, part_PD.sum(0).to(w_D.dtype) if need_w else None


def apply_rope_grad(g_THD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """x's grad of apply_rope: [g1 c + g2 s, g2 c - g1 s] in fp32, one rounding to dtype (x's)."""
    return rotate(g_THD, cos_TF, sin_TF, dtype, inverse=True)


@fast_launch
@triton.jit
def _silu_mul_grad_kernel(
    a_ptr, u_ptr, g_ptr, ga_ptr, gu_ptr, F, stride_a, stride_u, stride_g, stride_ga, stride_gu,
    BLOCK: tl.constexpr, NEED_A: tl.constexpr, NEED_U: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    if NEED_A:
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        ga = g * u * sig * (1.0 + a * (1.0 - sig))
        tl.store(ga_ptr + row * stride_ga + cols, ga.to(ga_ptr.dtype.element_ty), mask=mask)
    if NEED_U:
        tl.store(gu_ptr + row * stride_gu + cols, (g * a * sig).to(gu_ptr.dtype.element_ty), mask=mask)


def silu_mul_grad(a_MF: torch.Tensor, u_MF: torch.Tensor, g_MF: torch.Tensor, need_a: bool, need_u: bool):
    """(ga in a's dtype or None, gu in u's dtype or None) of y = silu(a) * u; 2-D, column slices allowed."""
    M, F = a_MF.shape
    a_MF, u_MF, g_MF = _unit_stride(a_MF), _unit_stride(u_MF), _unit_stride(g_MF)
    ga = torch.empty((M, F), dtype=a_MF.dtype, device=a_MF.device) if need_a else None
    gu = torch.empty((M, F), dtype=u_MF.dtype, device=u_MF.device) if need_u else None
    if M == 0 or F == 0 or not (need_a or need_u):
        return ga, gu
    ga_, gu_ = (ga if need_a else a_MF), (gu if need_u else a_MF)  # unused pointers: never stored to
    grid = (M, triton.cdiv(F, _SILU_BLOCK))
    _silu_mul_grad_kernel[grid](
        a_MF, u_MF, g_MF, ga_, gu_, F,
        a_MF.stride(0), u_MF.stride(0), g_MF.stride(0), ga_.stride(0), gu_.stride(0),
        BLOCK=_SILU_BLOCK, NEED_A=need_a, NEED_U=need_u, num_warps=4,
    )
    return ga, gu
