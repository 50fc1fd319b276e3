"""Triton kernels for check_row_sums_order_free, check_tree_sum and check_top_p_narrow_start
(test_triton_checks.py must not import triton)."""

import triton
import triton.language as tl

from miles_kernels._triton.attn_parts import exact_sum, fixed_sum
from miles_kernels._triton.cut import _start, _tree_sum


@triton.jit
def row_sums(p_ptr, o_ptr, FIXED: tl.constexpr):
    """o[r] = exact_sum (fixed_sum with FIXED) of row r of a [64, 64] fp32 p."""
    r = tl.arange(0, 64)
    p = tl.load(p_ptr + r[:, None] * 64 + tl.arange(0, 64)[None, :])
    tl.store(o_ptr + r, fixed_sum(p, 1) if FIXED else exact_sum(p, 1))


@triton.jit
def tree_sums(x_ptr, o_ptr, LOG: tl.constexpr):
    """o[r] = cut._tree_sum of row r of an [R, 2**LOG] fp32 x (one program a row)."""
    r = tl.program_id(0)
    tl.store(o_ptr + r, _tree_sum(tl.load(x_ptr + r * (1 << LOG) + tl.arange(0, 1 << LOG)), LOG))


@triton.jit
def whole_range(m, total, level, V, COUNT: tl.constexpr):
    """cut._narrow_start's stand-in: the whole float range (-inf, max], the search without the bound."""
    return _start(m)
