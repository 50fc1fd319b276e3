"""miles_kernels: batch-invariant ops shared by the trainer and the rollout engine.

One promise: an op's output row for a token does not depend on what else is in the batch,
where the row sits, or how a sequence was chunked (prefill / chunked prefill / decode).
So the engine's sampling log-probs equal the trainer's recomputed ones bit for bit.

Call the ops directly; ``set_mode("fast")`` / ``use_mode("fast")`` switch to vendor kernels
(cuBLAS, SDPA; the Triton row-wise and logprobs kernels stay on CUDA) for runs that accept a
train/rollout mismatch. Each op's docstring states its numerics contract (dtypes in and
out, cast points). Covered ops: linear (and linears: several weights of one input), rms_norm,
rope_cos_sin, apply_rope, silu_mul, the fused add_rms_norm (residual add, then rms_norm) and
qk_norm_rope (rms_norm of q's and k's heads, then apply_rope; qk_norm_rope_kv_attention: then
kv_attention, storing K/V from the same kernel in the engine) and swiglu (linears of the
gate and up weights, then silu_mul) with the bits of the ops they fuse, attention (and kv_attention: write the new K/V, then
attend), logprobs (and linear_logprobs, the lm_head and logprobs fused over row chunks),
route_topk, grouped_linear, moe_dispatch and moe_combine (a MoE layer's rows to its experts
and their weighted sum back).
Anything else in a policy forward (embedding lookup, residual adds, reshapes) is exact.
"""

from ._cpu import ATTN_BLOCK, CPU_ROW_TILE
from ._mode import MODES, get_mode, set_mode, use_mode
from .meta import AttnMeta, positions_from_cu_seqlens, varlen_meta, write_kv
from .ops import (add_rms_norm, apply_rope, attention, filter_logits, grouped_linear, kv_attention, linear,
                  linear_logprobs, linears, logprobs, moe_combine, moe_dispatch, qk_norm_rope,
                  qk_norm_rope_kv_attention, rms_norm, rope_cos_sin, route_topk, silu_mul, swiglu)

__all__ = [
    "ATTN_BLOCK", "CPU_ROW_TILE", "MODES", "AttnMeta", "add_rms_norm", "apply_rope", "attention", "filter_logits",
    "get_mode", "grouped_linear", "kv_attention", "linear", "linear_logprobs", "linears", "logprobs", "moe_combine",
    "moe_dispatch", "positions_from_cu_seqlens", "qk_norm_rope",
    "qk_norm_rope_kv_attention", "rms_norm", "rope_cos_sin", "route_topk", "set_mode",
    "silu_mul", "swiglu", "use_mode", "varlen_meta", "write_kv",
]
