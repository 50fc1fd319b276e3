"""The layers of a decoder block (Qwen3 dense/MoE, Qwen2, Llama), shared by the trunk
(transformer.py) and the MTP draft (mtp.py): architecture only, every numerically relevant
op a `miles_kernels` call. Shapes: T tokens, D hidden, H query heads, K kv heads, Dh head
dim, F ffn, P pages, S page size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import miles_kernels as mk
from miles_fsdp.models.args import ModelArgs
from miles_fsdp.models.moe import MoE


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

    def add_forward(self, delta_TD: torch.Tensor | None, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_TD, norm(h_TD)) for the residual stream h_TD = x_TD + delta_TD (x_TD alone when delta_TD
        is None): the add and the norm in one kernel (mk.add_rms_norm), the bits of the two ops."""
        if delta_TD is None:
            return x_TD, self(x_TD)
        return mk.add_rms_norm(delta_TD, x_TD, self.weight, self.eps)


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
        proj = (self.wq, self.wk, self.wv)
        q_TN, k_TN, v_TN = mk.linears(x_TD, [p.weight for p in proj],
                                      [p.bias for p in proj] if self.wq.bias is not None else None)
        q_THD = q_TN.view(T, self.n_heads, self.head_dim)
        k_TKD = k_TN.view(T, self.n_kv_heads, self.head_dim)
        v_TKD = v_TN.view(T, self.n_kv_heads, self.head_dim)
        scale = self.head_dim**-0.5
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm, RoPE (and the engine's K/V store): one kernel
            o_THD = mk.qk_norm_rope_kv_attention(q_THD, k_TKD, v_TKD, self.q_norm.weight, self.k_norm.weight, cos_TF,
                                                 sin_TF, self.q_norm.eps, k_cache_PSKD, v_cache_PSKD, meta, slot_T, scale)
        else:
            q_THD = mk.apply_rope(q_THD, cos_TF, sin_TF)
            k_TKD = mk.apply_rope(k_TKD, cos_TF, sin_TF)
            o_THD = mk.kv_attention(q_THD, k_TKD, v_TKD, k_cache_PSKD, v_cache_PSKD, meta, slot_T, scale)
        return self.wo(o_THD.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = Linear(dim, ffn_dim)
        self.w_up = Linear(dim, ffn_dim)
        self.w_down = Linear(ffn_dim, dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w_down(mk.swiglu(x_TD, self.w_gate.weight, self.w_up.weight))


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

    def forward(self, x_TD, delta_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD):
        """The residual stream comes in and goes out as a pair not yet summed: in, x_TD + delta_TD
        (delta_TD None: x_TD alone); out, (h_TD, ffn_TD) with h_TD + ffn_TD the block's output. So
        each residual add is one kernel with the norm that reads its sum (RMSNorm.add_forward):

            x + delta -> attn_norm -> attn -> (+) -> mlp_norm -> mlp/moe -> ffn_TD
               |                               |
               '---------- x_TD -------------> h_TD ----------------------> h_TD
        """
        x_TD, a_TD = self.attn_norm.add_forward(delta_TD, x_TD)
        attn_TD = self.attn(a_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD)
        h_TD, m_TD = self.mlp_norm.add_forward(attn_TD, x_TD)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return h_TD, ffn(m_TD)
