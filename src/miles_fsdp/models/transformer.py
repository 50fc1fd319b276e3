"""The decoder-only Transformer (Qwen3 dense/MoE, Qwen2, Llama): architecture only.

One class serves the trainer and the engine; only the attention metadata differs:
- training: `kv_caches=None`, `meta`/`slot_T` from `packed_inputs(cu_seqlens)`; each layer
  gets a scratch paged cache, K/V are written into it, then the same attention kernel runs;
- engine: `kv_caches` is the engine's per-layer (k_cache_PSKD, v_cache_PSKD) and `meta`
  carries its block tables.
Every numerically relevant op is a `miles_kernels` call. Shapes: T tokens, D hidden,
H query heads, K kv heads, Dh head dim, F ffn, V vocab, P pages, S page size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import miles_kernels as mk
from miles_fsdp.models.args import ModelArgs
from miles_fsdp.models.moe import MoE
from miles_fsdp.models.rope import rope_inv_freq

# Page size of the scratch cache built when kv_caches is None; packed_inputs uses it too.
TRAIN_PAGE_SIZE = mk.ATTN_BLOCK


def packed_inputs(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, mk.AttnMeta, torch.Tensor]:
    """(pos_T, meta, slot_T) for packed training sequences, matching forward's scratch cache."""
    meta, slot_T, _ = mk.varlen_meta(cu_seqlens, TRAIN_PAGE_SIZE)
    return mk.positions_from_cu_seqlens(cu_seqlens), meta, slot_T


class Linear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mk.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mk.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        # F.embedding, not weight[ids]: its backward sums repeated ids in a fixed order, where
        # indexing's (index_put_ accumulate) changes bits from run to run on multi-threaded CPU
        return F.embedding(ids_T, self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD):
        T = x_TD.shape[0]
        q_THD = self.wq(x_TD).view(T, self.n_heads, self.head_dim)
        k_TKD = self.wk(x_TD).view(T, self.n_kv_heads, self.head_dim)
        v_TKD = self.wv(x_TD).view(T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q_THD, k_TKD = self.q_norm(q_THD), self.k_norm(k_TKD)
        q_THD = mk.apply_rope(q_THD, cos_TF, sin_TF)
        k_TKD = mk.apply_rope(k_TKD, cos_TF, sin_TF)
        mk.write_kv(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T)
        o_THD = mk.attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta, self.head_dim**-0.5)
        return self.wo(o_THD.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = Linear(dim, ffn_dim)
        self.w_up = Linear(dim, ffn_dim)
        self.w_down = Linear(ffn_dim, dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w_down(mk.silu_mul(self.w_gate(x_TD), self.w_up(x_TD)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        # exactly one of mlp / moe, so state-dict names say which kind of layer this is
        if args.is_moe_layer(layer_id):
            self.moe = MoE(args)
        else:
            self.mlp = MLP(args.dim, args.ffn_dim)

    def forward(self, x_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD):
        h_TD = x_TD + self.attn(self.attn_norm(x_TD), cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return h_TD + ffn(self.mlp_norm(h_TD))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # tied: logits reuse embed.weight, so there is no second parameter to keep in sync
        self.lm_head = None if args.tie_embeddings else Linear(args.dim, args.vocab_size)
        self._rope_cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def forward(
        self,
        ids_T: torch.Tensor,
        pos_T: torch.Tensor,
        meta: mk.AttnMeta,
        slot_T: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, hidden_TD."""
        h_TD = self.embed(ids_T)
        inv_freq_F, scale = self._rope(ids_T.device)
        cos_TF, sin_TF = mk.rope_cos_sin(pos_T, inv_freq_F, scale)
        if kv_caches is None:
            kv_caches = self._scratch_caches(ids_T.shape[0], meta.num_seqs, h_TD)
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model has {len(self.layers)} layers")
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h_TD = layer(h_TD, cos_TF, sin_TF, meta, slot_T, k_cache, v_cache)
        return self.norm(h_TD)

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        # untied: call the module, so FSDP's pre-forward hook unshards lm_head's weight
        if self.lm_head is not None:
            return self.lm_head(hidden_TD)
        return mk.linear(hidden_TD, self.embed.weight)

    def token_logprobs(self, hidden_TD: torch.Tensor, ids_T: torch.Tensor, temperature: float = 1.0,
                       entropy: bool = False, top_k: int = 0, top_p: float = 1.0):
        """mk.logprobs(self.logits(hidden_TD), ids_T, ...) with the [T, V] logits never held
        whole (mk.linear_logprobs); the same values bit for bit. FSDP registers this as a
        forward method, so the root's weights are gathered for it."""
        w = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return mk.linear_logprobs(hidden_TD, w, ids_T, temperature, entropy, top_k, top_p)

    def _rope(self, device: torch.device) -> tuple[torch.Tensor, float]:
        # A plain cache, not a buffer: to_empty() on a meta model must not wipe it.
        if device not in self._rope_cache:
            inv_freq_F, scale = rope_inv_freq(self.args.rope, self.args.head_dim)
            self._rope_cache[device] = (inv_freq_F.to(device), scale)
        return self._rope_cache[device]

    def _scratch_caches(self, T: int, B: int, like_TD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # packed_inputs puts each sequence on fresh pages: at most ceil(T / S) + B pages,
        # known from shapes alone (no device sync). Zeros, so unread slots are finite.
        S = TRAIN_PAGE_SIZE
        shape = (-(-T // S) + B, S, self.args.n_kv_heads, self.args.head_dim)
        return [
            (like_TD.new_zeros(shape), like_TD.new_zeros(shape)) for _ in range(self.args.n_layers)
        ]

    @torch.no_grad()
    def init_weights(self, seed: int = 0, device: str | torch.device = "cpu", std: float = 0.02) -> "Transformer":
        """Random init (normal weights, zero biases, unit norms), reproducible on any device:
        values are drawn on CPU from one generator in parameter-name order."""
        if any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device)
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                full = torch.ones(p.shape)
            elif name.endswith(".bias"):
                full = torch.zeros(p.shape)
            else:
                full = torch.randn(p.shape, generator=g) * std
            p.data.copy_(full)
        return self
