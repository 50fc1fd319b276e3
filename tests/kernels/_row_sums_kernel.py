"""A Triton kernel for check_row_sums_order_free (test_triton_checks.py must not import triton)."""

import triton
import triton.language as tl

from miles_kernels._triton.attn_parts import exact_sum, fixed_sum


@triton.jit
def row_sums(p_ptr, o_ptr, FIXED: tl.constexpr):
    """o[r] = exact_sum (fixed_sum with FIXED) of row r of a [64, 64] fp32 p."""
    r = tl.arange(0, 64)
    p = tl.load(p_ptr + r[:, None] * 64 + tl.arange(0, 64)[None, :])
    tl.store(o_ptr + r, fixed_sum(p, 1) if FIXED else exact_sum(p, 1))
