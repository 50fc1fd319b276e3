"""The decoder-only Transformer (Qwen3 dense/MoE, Qwen2, Llama) and its MTP draft: architecture only.

One class serves the trainer and the engine; only the attention metadata differs:
- training: `kv_caches=None`, `meta`/`slot_T` from `packed_inputs(cu_seqlens)`; the layers
  share a scratch paged cache, K/V are written into it, then the same attention kernel runs
  (mk.kv_attention; its backward reads the packed K/V, not the cache);
- engine: `kv_caches` is the engine's per-layer (k_cache_PSKD, v_cache_PSKD) and `meta`
  carries its block tables.
The draft (`mtp`, `args.n_mtp` modules, mtp.py) runs the same way through `draft_forward`;
it shares the trunk's embedding and lm_head and never trains them (both are read detached).
Every numerically relevant op is a `miles_kernels` call. Shapes: T tokens, D hidden,
H query heads, K kv heads, Dh head dim, F ffn, V vocab, P pages, S page size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import miles_kernels as mk
from miles_kernels.meta import host_to_device
from miles_fsdp.models.args import ModelArgs
from miles_fsdp.models.layers import Attention, Block, Embedding, Linear, MLP, RMSNorm  # noqa: F401 (re-exported)
from miles_fsdp.models.mtp import MTPLayer
from miles_fsdp.models.rope import rope_inv_freq

# Page size of the scratch cache built when kv_caches is None; packed_inputs uses it too.
TRAIN_PAGE_SIZE = mk.ATTN_BLOCK


def packed_inputs(cu_seqlens: torch.Tensor, device=None) -> tuple[torch.Tensor, mk.AttnMeta, torch.Tensor]:
    """(pos_T, meta, slot_T) for packed training sequences, matching forward's scratch cache,
    on `device` (default: cu_seqlens'). Built on the host from CPU offsets: no device sync."""
    device = cu_seqlens.device if device is None else device
    cu = cu_seqlens.cpu()
    meta, slot_T, _ = mk.varlen_meta(cu, TRAIN_PAGE_SIZE, device)
    return host_to_device(mk.positions_from_cu_seqlens(cu), device), meta, slot_T


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # tied: logits reuse embed.weight, so there is no second parameter to keep in sync
        self.lm_head = None if args.tie_embeddings else Linear(args.dim, args.vocab_size)
        self.mtp = nn.ModuleList(MTPLayer(args, m) for m in range(args.n_mtp))  # empty: no draft
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
        h_TD, delta_TD = self.embed(ids_T), None  # the residual stream is h_TD + delta_TD (Block.forward)
        cos_TF, sin_TF = self._rope_cos_sin(pos_T)
        if kv_caches is None:
            kv_caches = self._scratch_caches(ids_T.shape[0], meta, h_TD, self.args.n_layers)
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model has {len(self.layers)} layers")
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h_TD, delta_TD = layer(h_TD, delta_TD, cos_TF, sin_TF, meta, slot_T, k_cache, v_cache)
        return self.norm.add_forward(delta_TD, h_TD)[1]

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

    def draft_forward(self, hidden_TD: torch.Tensor, ids_T: torch.Tensor, pos_T: torch.Tensor, meta: mk.AttnMeta,
                      slot_T: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                      module: int = 0) -> torch.Tensor:
        """G (pre-norm, g_TD) of draft module `module` on the input pairs (hidden_TD[i],
        emb(ids_T[i])) at RoPE positions pos_T, attention as `forward`'s: `meta`/`slot_T` and
        the module's own (k_cache_PSKD, v_cache_PSKD), or a scratch cache when kv_cache is
        None (training). The caller aligns hidden_TD (mtp.py): the trunk's H_{s-1} for entry s
        (0 at a sequence's first position), or the previous draft step's / module's g.
        The embedding table is read detached: the draft's loss never reaches it."""
        emb_TD = F.embedding(ids_T, self.embed.weight.detach())
        return self.mtp[module](hidden_TD, emb_TD, *self._draft_attn(pos_T, meta, slot_T, kv_cache, hidden_TD, module))

    def draft_logits(self, g_TD: torch.Tensor, module: int = 0) -> torch.Tensor:
        """logits_TV = lm_head(mtp[module].norm(g_TD)), through mk ops (lm_head read detached)."""
        return mk.linear(self.mtp[module].norm(g_TD), self._head_weight().detach())

    def draft_token_logprobs(self, hidden_TD: torch.Tensor, ids_T: torch.Tensor, pos_T: torch.Tensor,
                             meta: mk.AttnMeta, slot_T: torch.Tensor, targets_T: torch.Tensor, module: int = 0):
        """Training: (logp_T, hit_T, g_TD) of draft module `module` over a packed stream.

        logp_T: fp32 log-prob of targets_T under the draft (temperature 1), lm_head and
        log-softmax fused (mk.linear_logprobs, no [T, V] logits); gradients reach the mtp
        parameters and hidden_TD only (the caller detaches the trunk's hidden). hit_T: bool,
        targets_T[i] is the draft's argmax at i (no grad). g_TD: the module's output, the
        hidden input of module + 1. FSDP registers this as a forward method of the root."""
        emb_TD = F.embedding(ids_T, self.embed.weight.detach())
        attn = self._draft_attn(pos_T, meta, slot_T, None, hidden_TD, module)
        g_TD, out_TD = self.mtp[module].forward_normed(hidden_TD, emb_TD, *attn)
        w_VD = self._head_weight().detach()
        logp_T, _ = mk.linear_logprobs(out_TD, w_VD, targets_T)
        with torch.no_grad():  # top-1 filter: the target keeps a finite log-prob iff it is the argmax
            hit_T = torch.isfinite(mk.linear_logprobs(out_TD.detach(), w_VD, targets_T, top_k=1)[0])
        return logp_T, hit_T, g_TD

    def _head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def _draft_attn(self, pos_T, meta, slot_T, kv_cache, like_TD, module: int):
        if not 0 <= module < len(self.mtp):
            raise ValueError(f"draft module {module} does not exist: the model has {len(self.mtp)} (args.n_mtp)")
        if kv_cache is None:
            kv_cache = self._scratch_caches(pos_T.shape[0], meta, like_TD, 1)[0]
        return (*self._rope_cos_sin(pos_T), meta, slot_T, *kv_cache)

    def _rope_cos_sin(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_F, scale = self._rope(pos_T.device)
        return mk.rope_cos_sin(pos_T, inv_freq_F, scale)

    def _rope(self, device: torch.device) -> tuple[torch.Tensor, float]:
        # A plain cache, not a buffer: to_empty() on a meta model must not wipe it.
        if device not in self._rope_cache:
            inv_freq_F, scale = rope_inv_freq(self.args.rope, self.args.head_dim)
            self._rope_cache[device] = (inv_freq_F.to(device), scale)
        return self._rope_cache[device]

    def _scratch_caches(self, T: int, meta: mk.AttnMeta, like_TD: torch.Tensor,
                        n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # packed_inputs puts each sequence on fresh pages: at most ceil(T / S) + B pages,
        # known from shapes alone (no device sync). Zeros, so unread slots are finite.
        # Packed sequences (meta.packed): one cache for every layer, as kv_attention never
        # differentiates through it and each layer overwrites the same slots.
        S = TRAIN_PAGE_SIZE
        shape = (-(-T // S) + meta.num_seqs, S, self.args.n_kv_heads, self.args.head_dim)
        if meta.packed:
            return [(like_TD.new_zeros(shape), like_TD.new_zeros(shape))] * n
        return [(like_TD.new_zeros(shape), like_TD.new_zeros(shape)) for _ in range(n)]

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
