"""Triton (CUDA) forward kernels of miles_kernels, batch-invariant by construction.

Every kernel uses one fixed tile configuration per dtype (linear: per dtype and M bucket,
with the same K walk in every bucket), no split-K, no autotune and no atomics, so a row's
result never depends on how many rows share the launch or where the row sits.
The package is imported only for CUDA tensors in invariant mode (and by the interpreter
tests under TRITON_INTERPRET=1); backward passes live in torch, in miles_kernels/__init__.py.
"""

from miles_kernels._triton.paged_attention import ATTN_BLOCK, KV_SPLIT, attention
from miles_kernels._triton.elementwise import apply_rope, rms_norm, silu_mul
from miles_kernels._triton.matmul import GROUPED_TILES, LINEAR_TILES, grouped_linear, linear, linear_tile
from miles_kernels._triton.rows import filter_logits, logprobs, route_topk, top_p_cutoff

__all__ = [
    "ATTN_BLOCK",
    "GROUPED_TILES",
    "KV_SPLIT",
    "LINEAR_TILES",
    "apply_rope",
    "attention",
    "filter_logits",
    "grouped_linear",
    "linear",
    "linear_tile",
    "logprobs",
    "rms_norm",
    "route_topk",
    "silu_mul",
    "top_p_cutoff",
]
