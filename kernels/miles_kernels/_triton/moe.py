"""MoE combine: out[t] = sum_j w[t, j] * y[pos[t, j]], one program per (token, column block).

The k products are summed in fp32 in slot order j = 0, 1, ... with an explicit fma from j = 1
(never left to the compiler's contraction), then rounded once to y's dtype. A token's row
reads only its own k rows of y, so it does not depend on the batch.

Backward (deterministic, not batch-invariant; the math of the torch rules in _grads.py and
models' dispatch): moe_combine_grad, one program per token over all columns (dy rows, and the
k dot products of dw without atomics); gather_sum, a token's k rows summed in slot order.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch

_BLOCK = 1024


@fast_launch
@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, stride_y, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    r = tl.load(pos_ptr + t * K).to(tl.int64)
    acc = tl.load(y_ptr + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(w_ptr + t * K).to(tl.float32)
    for j in tl.static_range(1, K):
        r = tl.load(pos_ptr + t * K + j).to(tl.int64)
        y = tl.load(y_ptr + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(y, tl.load(w_ptr + t * K + j).to(tl.float32), acc)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _per_token(kernel, y_RD, pos_Tk, *extra):
    """Launch kernel over (token, column block): y rows with unit stride in, [T, D] of y's dtype out."""
    T, k = pos_Tk.shape
    D = y_RD.shape[1]
    y = y_RD if y_RD.stride(-1) == 1 else y_RD.contiguous()
    out = torch.empty((T, D), dtype=y_RD.dtype, device=y_RD.device)
    if T and D:
        block = min(_BLOCK, triton.next_power_of_2(D))
        kernel[(T, triton.cdiv(D, block))](y, pos_Tk.contiguous(), *extra, out, D, y.stride(0), out.stride(0), K=k,
                                            BLOCK=block, num_warps=4)
    return out


def moe_combine(y_RD: torch.Tensor, pos_Tk: torch.Tensor, w_Tk: torch.Tensor) -> torch.Tensor:
    return _per_token(_combine_kernel, y_RD, pos_Tk, w_Tk.contiguous())


@fast_launch
@triton.jit
def _combine_grad_kernel(y_ptr, pos_ptr, w_ptr, g_ptr, gy_ptr, gw_ptr, D, stride_y, stride_g, stride_gy,
                         K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    gw = tl.zeros([K_PAD], dtype=tl.float32)
    for c0 in range(0, D, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < D
        g = tl.load(g_ptr + t * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            r = tl.load(pos_ptr + t * K + j).to(tl.int64)
            y = tl.load(y_ptr + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            gw = tl.where(ks == j, gw + tl.sum(g * y, 0), gw)
            wj = tl.load(w_ptr + t * K + j).to(tl.float32)
            tl.store(gy_ptr + r * stride_gy + cols, (g * wj).to(gy_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + t * K + ks, gw.to(gw_ptr.dtype.element_ty), mask=ks < K)


def moe_combine_grad(y_RD, pos_Tk, w_Tk, g_TD):
    """(dy, dw) of moe_combine: dy[pos[t, j]] = g[t] * w[t, j] (rows no slot reads: 0), dw[t, j] = g[t] . y[pos[t, j]]."""
    T, k = pos_Tk.shape
    D = y_RD.shape[1]
    y = y_RD if y_RD.stride(-1) == 1 else y_RD.contiguous()
    g = g_TD if g_TD.stride(-1) == 1 else g_TD.contiguous()
    gy = torch.zeros_like(y)
    gw = torch.empty((T, k), dtype=w_Tk.dtype, device=w_Tk.device)
    if T and D:
        _combine_grad_kernel[(T,)](y, pos_Tk.contiguous(), w_Tk.contiguous(), g, gy, gw, D, y.stride(0), g.stride(0),
                                   gy.stride(0), K=k, K_PAD=triton.next_power_of_2(k),
                                   BLOCK=min(_BLOCK, triton.next_power_of_2(D)), num_warps=4)
    elif T:
        gw.zero_()
    return gy, gw


@fast_launch
@triton.jit
def _gather_sum_kernel(x_ptr, pos_ptr, out_ptr, D, stride_x, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(pos_ptr + t * K + j).to(tl.int64)
        acc += tl.load(x_ptr + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(x_RD, pos_Tk):
    """out[t] = sum_j x[pos[t, j]] in fp32, slot order, rounded to x's dtype: [T, D]."""
    return _per_token(_gather_sum_kernel, x_RD, pos_Tk)
