"""A stand-in with the Transformer's interface (forward(ids, pos, meta, slot), logits,
`layers`, `embed`, `lm_head`) for trainer tests that must not depend on model details.
Each block mixes tokens causally within its own sequence (cumulative mean over
`meta.cu_seqlens_q`), so packing bugs that leak across sequences change the numbers."""

import torch
from torch import nn

import miles_kernels as mk


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * dim, dim) * 0.2)
        self.w_out = nn.Parameter(torch.randn(dim, 2 * dim) * 0.2)

    def forward(self, x_TD, meta):
        cu = meta.cu_seqlens_q.long().tolist()
        mixed = []
        for lo, hi in zip(cu[:-1], cu[1:]):
            seg = x_TD[lo:hi]
            mixed.append(seg.cumsum(0) / torch.arange(1, hi - lo + 1, device=x_TD.device)[:, None])
        m_TD = torch.cat(mixed)
        h = torch.tanh(mk.linear(m_TD, self.w_in))
        return x_TD + mk.linear(h, self.w_out)


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim) * 0.5)

    def forward(self, ids_T):
        return self.weight[ids_T]


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim) * 0.2)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 16, n_layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = Embed(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_layers))
        self.norm_w = nn.Parameter(torch.ones(dim))
        self.lm_head = Head(dim, vocab)

    def forward(self, ids_T, pos_T, meta, slot_T, kv_caches=None):
        h = self.embed(ids_T)
        for layer in self.layers:
            h = layer(h, meta)
        return mk.rms_norm(h, self.norm_w, 1e-6)

    def logits(self, hidden_TD):
        return mk.linear(hidden_TD, self.lm_head.weight)
