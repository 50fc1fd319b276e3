"""Gumbel-max sampling with counter-based noise, and the logprob of what was sampled.

token = argmax(filter(logits / T) + g), g = -log(-log(u)), u = hash(seed, sample index,
position, token id) mapped to (0, 1). The noise is a pure function of those four integers,
computed on device with int64 ops kept to 32 bits (every product < 2**63, no overflow), so
a sample depends neither on the batch nor on the device's RNG state: any sample can be
replayed from (seed, sample index). argmax over filter(logits / T) + Gumbel noise is an exact
draw from softmax(filter(logits / T)); `filter` is mk.filter_logits, the top-k/top-p mask
that mk.logprobs applies too. So the recorded logprob, mk.logprobs(logits, id, T, top_k,
top_p), is the log-probability of the token under the distribution it was drawn from.

Temperature 0 is greedy argmax; its logprob is recorded at temperature 1 (same filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import miles_kernels as mk
import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32-style finalizer: a bijection on 32-bit ints; multipliers < 2**31 keep int64 exact
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed_B: torch.Tensor, stream_B: torch.Tensor, pos_B: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise, fp32 [B, vocab], a pure function of (seed, stream, position, token id)."""
    h_B = _mix32(_mix32(_mix32(seed_B.long()) ^ stream_B.long()) ^ pos_B.long())
    tok_V = torch.arange(vocab, device=seed_B.device, dtype=torch.int64)
    h_BV = _mix32(h_B[:, None] ^ tok_V[None, :])  # distinct per token within a row
    u_BV = ((h_BV >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in fp32, in (0, 1)
    return -torch.log(-torch.log(u_BV))


@dataclass(frozen=True)
class RowParams:
    """Sampling parameters of one logits row."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    stream: int  # sample index within the request
    position: int  # position the sampled token will take


def sample(logits_BV: torch.Tensor, rows: list[RowParams]) -> tuple[list[int], list[float]]:
    """Sample one token per row; returns (token ids, fp32 logprobs as Python floats)."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    ids_B = torch.empty(B, dtype=torch.int64, device=dev)
    logp_B = torch.empty(B, dtype=torch.float32, device=dev)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
    for (temp, top_k, top_p), idx in groups.items():
        idx_G = torch.tensor(idx, device=dev)
        logits_GV = logits_BV.index_select(0, idx_G)
        if temp == 0.0:
            chosen_G = logits_GV.argmax(-1)
            temp = 1.0
        else:
            sel = [rows[i] for i in idx]
            meta_3G = torch.tensor([[r.seed for r in sel], [r.stream for r in sel], [r.position for r in sel]])
            meta_3G = meta_3G.to(dev)
            x_GV = mk.filter_logits(logits_GV.float() / temp, top_k, top_p)
            chosen_G = (x_GV + gumbel_noise(meta_3G[0], meta_3G[1], meta_3G[2], V)).argmax(-1)
        lp_G, _ = mk.logprobs(logits_GV, chosen_G, temp, top_k=top_k, top_p=top_p)
        ids_B[idx_G] = chosen_G
        logp_B[idx_G] = lp_G
    return ids_B.tolist(), logp_B.tolist()
