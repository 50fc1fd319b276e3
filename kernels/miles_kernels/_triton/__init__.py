"""Triton (CUDA) kernels of miles_kernels: forwards batch-invariant by construction.

Every kernel uses one fixed tile configuration per dtype (linear: per dtype and M bucket,
with the same K walk in every bucket), no split-K, no autotune and no atomic sums, so a row's
result never depends on how many rows share the launch or where the row sits (stream-K, streamk.py,
off by default, hands a tile's fp32 accumulator from one program to the next behind a flag: the
same sums in the same order).
The package is imported only for CUDA tensors in invariant mode (and by the interpreter
tests under TRITON_INTERPRET=1). The row-local ops' backward rules (miles_kernels/_grads.py)
run on CUDA as the kernels of elementwise_grads (deterministic, not batch-invariant), and
logprobs' as logprobs_grad, the packed training attention's (behind MILES_ATTN_BWD=triton) as
attention_bwd, moe_combine's and moe_dispatch's in moe; the other backward passes live in torch, in miles_kernels/ops.py.
On Hopper (sm_90) the packed training attention's forward and its backward's dK/dV and dQ run as Gluon
kernels (gluon_attention.py, gluon_attention_bwd.py: Triton's explicit-layout dialect, with
warp specialization and overlapped wgmmas) that give the Triton kernels' values exactly; no
interpreter runs Gluon, so tests/gpu compares them with the Triton kernels bit for bit.
gluon_grouped.py, grouped_linear's TMA tiles with half tiles at an expert's end, waits behind
matmul.GLUON_GROUPED (off) for its first GPU check; gluon_gate.py decides where Gluon may run.
fused_linears.py holds the decode step's fused linears (q|k|v, gate|up with silu_mul) on matmul's tiles.
Beside the ops: adamw.py, the trainer's optimizer step in one pass (torch's fused AdamW values,
the bf16 grads in and the next forward's bf16 parameters out; train/optim.py).
"""

from miles_kernels._triton.paged_attention import ATTN_BLOCK, KV_SPLIT, attention, packed_attention
from miles_kernels._triton.attention_bwd import packed_attention_bwd
from miles_kernels._triton.elementwise import (add_rms_norm, apply_rope, qk_norm_rope, qk_norm_rope_write_kv, rms_norm,
                                              silu_mul)
from miles_kernels._triton.elementwise_grads import apply_rope_grad, rms_norm_grad, silu_mul_grad
from miles_kernels._triton.logprobs_grad import logprobs_grad
from miles_kernels._triton.moe import gather_sum, moe_combine, moe_combine_grad
from miles_kernels._triton.matmul import GROUPED_TILES, LINEAR_TILES, grouped_linear, grouped_tile, linear, linear_tile
from miles_kernels._triton.fused_linears import linears, swiglu
from miles_kernels._triton.rows import filter_floor, filter_logits, logprobs, route_topk
from miles_kernels._triton.cut import top_k_floor, top_p_cutoff

__all__ = [
    "ATTN_BLOCK",
    "GROUPED_TILES",
    "KV_SPLIT",
    "LINEAR_TILES",
    "add_rms_norm",
    "apply_rope",
    "apply_rope_grad",
    "attention",
    "filter_floor",
    "filter_logits",
    "gather_sum",
    "grouped_linear",
    "grouped_tile",
    "linear",
    "linear_tile",
    "linears",
    "logprobs",
    "logprobs_grad",
    "moe_combine",
    "moe_combine_grad",
    "packed_attention",
    "packed_attention_bwd",
    "qk_norm_rope",
    "qk_norm_rope_write_kv",
    "rms_norm",
    "rms_norm_grad",
    "route_topk",
    "silu_mul",
    "silu_mul_grad",
    "swiglu",
    "top_k_floor",
    "top_p_cutoff",
]
