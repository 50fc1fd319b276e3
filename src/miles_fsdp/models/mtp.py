"""The MTP draft module (DeepSeek-V3 / MiMo / Qwen3-Next form): architecture only.

One module m turns a hidden state and the embedding of the next token into a new hidden
state, from which the trunk's (shared) lm_head predicts one token further:

    hidden_TD --hnorm--.                                   (trunk output H, or G of module m-1)
                       cat([enorm(emb), hnorm(hidden)]) --eh_proj (2D -> D)--> block --> g_TD
    emb_TD ----enorm---'                                   (a trunk Block, same kind as the last)
    logits_TV = lm_head(norm(g_TD))                        (norm: the module's own final norm)

The draft stream (teacher forcing), for one sequence x_0 .. x_{L-1} with trunk outputs H_s
(`Transformer.forward`, after the trunk's final norm):

    module 0, entry s:  input (H_{s-1}, emb(x_s)), H_{-1} = 0     RoPE position s
                        output G^0_s;  lm_head(norm(G^0_s)) predicts x_{s+1}
    module m, entry s:  input (G^{m-1}_s, emb(x_{s+m}))            RoPE position s + m
                        output G^m_s;  lm_head(norm(G^m_s)) predicts x_{s+m+1}

This is DeepSeek-V3's chaining (paper section 2.2, "h_i^k = M_k [RMSNorm(h_i^{k-1});
RMSNorm(Emb(t_{i+k}))]", predicting t_{i+k+1}; transformers' MtpModel rolls the ids and the
positions by one per depth the same way), with entries indexed by the position s = i + 1 of
the first embedded token. Attention in every module is causal over its own stream of the
same sequence (entry s sees entries 0..s), through the same `mk.attention` and metadata as
the trunk: packed varlen with a scratch cache in training, paged KV in the engine. Entries
whose token x_{s+m} lies past the sequence end are padding at the end of each sequence, so
causal attention never lets them reach a valid entry.

Training uses every module on that stream (the loss of module m predicts x_{s+m+1}); the
engine runs module 0 recurrently, EAGLE-style: the G of one draft step is the hidden input
of the next, at the next position. `Transformer.draft_forward` / `draft_logits` are the
single-module API for that.

Real checkpoints store the input projection over [emb, hidden] (DeepSeek-V3, Qwen3-Next) or
[hidden, emb] (MiMo); ours is [emb, hidden], and state_dict_adapter.py swaps MiMo's halves.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_fsdp.models.args import ModelArgs
from miles_fsdp.models.layers import Block, Linear, RMSNorm


class MTPLayer(nn.Module):
    """Draft module `module` (0-based; depth module + 1). Parameters: enorm, hnorm [D]; eh_proj
    [D, 2D]; block (a trunk Block, dense or MoE like the last trunk layer); norm [D]."""

    def __init__(self, args: ModelArgs, module: int):
        super().__init__()
        self.module = module
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim)
        self.block = Block(args, layer_id=args.n_layers - 1)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, hidden_TD, emb_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD) -> torch.Tensor:
        """g_TD: the block's output residual stream (before `norm`)."""
        h_TD, ffn_TD = self._block(hidden_TD, emb_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD)
        return h_TD + ffn_TD

    def forward_normed(self, hidden_TD, emb_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD):
        """(g_TD, norm(g_TD)) in one call: FSDP registers this as a forward method, so training
        gathers the module's weights once for both (the lm_head input needs `norm`); the block's
        last add and `norm` are one kernel (RMSNorm.add_forward)."""
        h_TD, ffn_TD = self._block(hidden_TD, emb_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD)
        return self.norm.add_forward(ffn_TD, h_TD)

    def _block(self, hidden_TD, emb_TD, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD):
        """The block's (h_TD, ffn_TD), whose sum is g_TD (Block.forward)."""
        x_TD = self.eh_proj(torch.cat([self.enorm(emb_TD), self.hnorm(hidden_TD)], dim=-1))
        return self.block(x_TD, None, cos_TF, sin_TF, meta, slot_T, k_cache_PSKD, v_cache_PSKD)


@torch.no_grad()
def fresh_draft_constants(dim: int) -> dict[str, torch.Tensor]:
    """The parameters of a fresh draft module that do not come from the trunk: enorm and hnorm
    at 1, eh_proj = [0 | I] (passes the normed hidden through, so the fresh draft is "one more
    last layer" on the trunk's output). Deterministic; the block copies the trunk's last
    decoder layer and `norm` the trunk's final norm (state_dict_adapter.load_targets(args, fresh_draft=True))."""
    eh_proj_D2D = torch.zeros(dim, 2 * dim)
    eh_proj_D2D[:, dim:] = torch.eye(dim)
    return {"enorm.weight": torch.ones(dim), "hnorm.weight": torch.ones(dim), "eh_proj.weight": eh_proj_D2D}
