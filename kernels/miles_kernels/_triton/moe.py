"""MoE combine: out[t] = sum_j w[t, j] * y[pos[t, j]], one program per (token, column block).

The k products are summed in fp32 in slot order j = 0, 1, ... with an explicit fma from j = 1
(never left to the compiler's contraction), then rounded once to y's dtype. A token's row
reads only its own k rows of y, so it does not depend on the batch.
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


def moe_combine(y_RD: torch.Tensor, pos_Tk: torch.Tensor, w_Tk: torch.Tensor) -> torch.Tensor:
    T, k = pos_Tk.shape
    D = y_RD.shape[1]
    y = y_RD if y_RD.stride(-1) == 1 else y_RD.contiguous()
    out = torch.empty((T, D), dtype=y_RD.dtype, device=y_RD.device)
    if T and D:
        block = min(_BLOCK, triton.next_power_of_2(D))
        _combine_kernel[(T, triton.cdiv(D, block))](
            y, pos_Tk.contiguous(), w_Tk.contiguous(), out, D, y.stride(0), out.stride(0), K=k, BLOCK=block,
            num_warps=4)
    return out
