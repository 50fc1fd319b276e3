"""EngineConfig: the knobs of the in-process rollout engine (docstrings become --help)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal


CPU_KV_BYTES = 256 * 2**20  # the KV cache on CPU when no size is given


def cpu_kv_bytes() -> int:
    """KV cache bytes on CPU when none is set: CPU_KV_BYTES, at most a quarter of the RAM."""
    return min(CPU_KV_BYTES, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


AUTO_PREFILL_TOKENS = (16384, 8192, 4096)  # max_prefill_tokens=0's choices, largest first


def prefill_bytes_per_token(args, itemsize: int) -> int:
    """A prefill step's activation bytes per token, estimated from the model's widths (ModelArgs):
    one layer's live tensors (the residual stream and its norm 4 x dim; q, k, v and the attention
    output; the MLP's gate, up and product, or a MoE layer's routed copies: k x (dim in + dim out
    + 3 x moe_ffn_dim)), times 2 for the allocator's slack and the kernels' temporaries."""
    attn = (2 * args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    mlp = 3 * args.ffn_dim
    if args.n_experts:
        mlp = max(mlp, args.n_experts_per_tok * (2 * args.dim + 3 * args.moe_ffn_dim))
    return 2 * itemsize * (4 * args.dim + attn + mlp)


def auto_prefill_tokens(args, itemsize: int, free_bytes: int) -> int:
    """max_prefill_tokens=0: the largest of AUTO_PREFILL_TOKENS whose activations fit in free_bytes
    (the device memory the KV cache leaves), else the smallest."""
    per_token = prefill_bytes_per_token(args, itemsize)
    return next((n for n in AUTO_PREFILL_TOKENS if n * per_token <= free_bytes), AUTO_PREFILL_TOKENS[-1])


@dataclass
class EngineConfig:
    page_size: int = 64
    """Tokens per KV page; must be a multiple of miles_kernels.ATTN_BLOCK."""
    kv_memory_fraction: float = 0.85
    """CUDA: fraction of the device memory free after loading the model given to the KV cache."""
    kv_memory_bytes: int = 0
    """Bytes for the KV cache; overrides kv_memory_fraction on CUDA when > 0. On CPU, 0 means
    CPU_KV_BYTES (256 MiB, at most a quarter of the RAM), logged when the engine starts."""
    num_pages: int = 0
    """Exact number of KV pages (page 0 is a scratch page); overrides both memory settings when > 0."""
    max_num_seqs: int = 256
    """Most sequences (samples) running at once."""
    max_prefill_tokens: int = 0
    """Token budget of one prefill step; longer prompts are prefilled in chunks whose
    boundaries fall on multiples of miles_kernels.ATTN_BLOCK. 0: chosen when the engine starts
    (Engine.max_prefill_tokens, logged): on CUDA the largest of 16384, 8192, 4096 whose
    activations (estimated from the model's widths) fit beside the KV cache, 4096 on CPU.
    Prefill steps run eagerly (~10 op launches a layer each), so fewer, larger steps cost the
    host less: 16384 against 4096 was +66% tok/s at 0.6B, 256 prompts of 1024 (H200, 2026-12-05)."""
    max_model_len: int = 0
    """Longest prompt + completion; 0 means the model's max_position_embeddings (if known)."""
    prefix_cache: bool = True
    """Share full KV pages between requests with a common prefix (and the n samples of one)."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs (GPU only; outputs are bitwise the same as eager)."""
    cuda_graphs_required: bool = False
    """Raise when a decode graph fails to capture, instead of warning and decoding eagerly
    (tests and benchmarks set it; runs log `engine/cuda_graphs_active` either way)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch captured; larger batches run eagerly."""
    cuda_graph_by_width: bool = False
    """Also key decode graphs by a power-of-two block-table width, captured on first use
    (less attention work on short sequences; each new width pays a capture)."""
    overlap_schedule: bool = True
    """Launch each decode step before post-processing the previous one (its input ids taken
    from the previous step's samples on the device), so the host's scheduling and
    bookkeeping run while the GPU computes. Decode steps on CUDA graphs without speculation
    only; the same tokens and logprobs as without it."""
    weight_update: Literal["finish", "restart"] = "finish"
    """What update_weights does with samples already generating: 'finish' runs them to the
    end on the old weights first; 'restart' drops their tokens and restarts them on the new."""
    num_speculative_tokens: int = 0
    """K: draft K tokens per running sequence with the model's MTP module and verify them in one
    target forward (0 = off). Exact: outputs and log-probs are those of K = 0, only faster
    (in invariant mode; fast mode promises no bits). With cuda_graphs, verify steps (1 + K
    rows per sequence) and the draft chain replay CUDA graphs."""
    seed: int = 0
    """Seeds the draw of per-request seeds for requests that give none."""

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}: expected {want}")

        if self.page_size < 1:
            bad("page_size", "a positive multiple of miles_kernels.ATTN_BLOCK")
        if not 0.0 < self.kv_memory_fraction < 1.0:
            bad("kv_memory_fraction", "a fraction in (0, 1)")
        if self.kv_memory_bytes < 0:
            bad("kv_memory_bytes", ">= 0")
        if self.num_pages < 0 or self.num_pages == 1:
            bad("num_pages", "0 (size from memory) or >= 2")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", ">= 1")
        if self.max_prefill_tokens < 0 or 0 < self.max_prefill_tokens < self.page_size:
            bad("max_prefill_tokens", f"0 (chosen at start) or >= page_size ({self.page_size})")
        if self.max_model_len < 0:
            bad("max_model_len", ">= 0")
        if self.cuda_graph_max_batch < 1:
            bad("cuda_graph_max_batch", ">= 1")
        if self.num_speculative_tokens < 0:
            bad("num_speculative_tokens", ">= 0 (0 = no speculation)")
        if self.weight_update not in ("finish", "restart"):
            bad("weight_update", "'finish' or 'restart'")

    def check_kernel_alignment(self, attn_block: int) -> None:
        if self.page_size % attn_block:
            raise ValueError(
                f"EngineConfig.page_size={self.page_size}: must be a multiple of miles_kernels.ATTN_BLOCK "
                f"({attn_block}); try {max(attn_block, self.page_size // attn_block * attn_block)}"
            )
