"""Plain-torch implementations: the fast mode, and the autograd rule of the invariant ops.

These use vendor kernels (cuBLAS, SDPA, ATen reductions) whose results can depend on the
batch. They define the math every other implementation must reproduce, and invariant ops
recompute through them in backward (the backward need not be invariant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .meta import AttnMeta


def _f32(x):
    """Upcast to at least fp32 (float64 references stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear(x, w_NK, b_N=None):
    return F.linear(x, w_NK, b_N)


def linears(x, ws, bs=None):
    return tuple(F.linear(x, w, None if bs is None else bs[i]) for i, w in enumerate(ws))


def rms_norm(x, w, eps: float):
    xf = _f32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def add_rms_norm(x, residual, w, eps: float):
    h = x + residual
    return h, rms_norm(h, w, eps)


def rope_cos_sin(pos_T, inv_freq_F, scale: float = 1.0):
    f_TF = _f32(pos_T)[:, None] * _f32(inv_freq_F)[None, :]
    if scale == 1.0:  # x * 1.0 is x: two kernels fewer a step
        return f_TF.cos(), f_TF.sin()
    return f_TF.cos() * scale, f_TF.sin() * scale


def apply_rope(x_THD, cos_TF, sin_TF):
    F_ = x_THD.shape[-1] // 2
    xf = _f32(x_THD)
    x1, x2 = xf[..., :F_], xf[..., F_:]
    c, s = cos_TF[:, None, :], sin_TF[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x_THD.dtype)


def qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps: float):
    """apply_rope(rms_norm(x, w)) of q and of k; rms_norm on [rows, D] as ops.rms_norm calls it."""
    D = q_THD.shape[-1]

    def one(x, w):
        return apply_rope(rms_norm(x.reshape(-1, D), w, eps).reshape(x.shape), cos_TF, sin_TF)

    return one(q_THD, q_w_D), one(k_TKD, k_w_D)


def silu_mul(gate, up):
    return (F.silu(_f32(gate)) * _f32(up)).to(gate.dtype)


def gather_kv(cache_PSKD, pages, length: int):
    """One sequence's KV from its pages: [length, K, D]."""
    P, S, K, D = cache_PSKD.shape
    return cache_PSKD[pages.long()].reshape(-1, K, D)[:length]


BATCHED_MAX_Q = 16
"""Queries per sequence up to which attention takes the batched (padded-KV, masked) path."""


def attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, scale: float):
    """Causal GQA attention per sequence with SDPA (fp32 softmax inside SDPA's kernel).

    A few queries for every sequence, the same number (T == B * max_q_len <= B * 16: decode,
    and the padded speculative verify), take a batched path with no host sync, so it can be
    captured in a CUDA graph; anything else (prefill, training: SDPA's causal kernels, O(L)
    memory) loops over sequences.
    """
    T, H, D = q_THD.shape
    if T > 0 and 0 < meta.max_q_len <= BATCHED_MAX_Q and T == meta.kv_lens.shape[0] * meta.max_q_len:
        return _decode_attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta, scale)
    K = k_cache_PSKD.shape[2]
    S = k_cache_PSKD.shape[1]
    cu, kv_lens = meta.host_lists()
    outs = []
    for b, L in enumerate(kv_lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        pages = meta.block_table[b, : (L + S - 1) // S]
        k_LKD = gather_kv(k_cache_PSKD, pages, L)
        v_LKD = gather_kv(v_cache_PSKD, pages, L)
        q_HqD = q_THD[cu[b]: cu[b + 1]].transpose(0, 1)
        k_HLD = k_LKD.transpose(0, 1).repeat_interleave(H // K, dim=0).to(q_THD.dtype)
        v_HLD = v_LKD.transpose(0, 1).repeat_interleave(H // K, dim=0).to(q_THD.dtype)
        # 4-D [1, H, L, D]: SDPA's flash / memory-efficient kernels take no 3-D input
        q4, k4, v4 = q_HqD[None], k_HLD[None], v_HLD[None]
        if q_len == L:  # the whole sequence (training): causal kernels, O(L) memory
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
        else:
            q_pos = torch.arange(L - q_len, L, device=q_THD.device)
            mask_qL = torch.arange(L, device=q_THD.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask_qL, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q_THD.new_zeros(0, H, D)


def packed_attention(q_THD, k_TKD, v_TKD, lens, scale: float):
    """Causal GQA attention of whole sequences packed back to back (training), lens host ints:
    the math of `attention` for q_len == kv_len, read from the packed K/V (no pages). split,
    not slicing, so autograd joins the sequences' grads with one cat."""
    H, D = q_THD.shape[1:]
    G = H // k_TKD.shape[1]
    outs = []
    for q_LHD, k_LKD, v_LKD in zip(q_THD.split(lens), k_TKD.split(lens), v_TKD.split(lens)):
        if q_LHD.shape[0] == 0:
            continue
        q4 = q_LHD.transpose(0, 1)[None]
        k4 = k_LKD.transpose(0, 1).repeat_interleave(G, dim=0).to(q_THD.dtype)[None]
        v4 = v_LKD.transpose(0, 1).repeat_interleave(G, dim=0).to(q_THD.dtype)[None]
        outs.append(F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q_THD.new_zeros(0, H, D)


def _decode_attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, scale: float):
    """R = max_q_len queries per sequence, query i at position kv_len - R + i: gather the
    table's pages into a padded [B, W*S] KV view, mask positions past each query, one SDPA
    call. GQA without repeating KV: the R x G queries of a kv head are rows of that head."""
    T, H, D = q_THD.shape
    P, S, K, _ = k_cache_PSKD.shape
    B, R, G, W = meta.kv_lens.shape[0], meta.max_q_len, H // K, meta.block_table.shape[1]
    pages_BW = meta.block_table.long()
    k_BKLD = k_cache_PSKD[pages_BW].reshape(B, W * S, K, D).transpose(1, 2).to(q_THD.dtype)
    v_BKLD = v_cache_PSKD[pages_BW].reshape(B, W * S, K, D).transpose(1, 2).to(q_THD.dtype)
    dev = q_THD.device
    end_BR = meta.kv_lens[:, None].long() - R + 1 + torch.arange(R, device=dev)[None, :]  # one past each query
    mask_BRL = torch.arange(W * S, device=dev)[None, None, :] < end_BR[:, :, None]
    mask_B1QL = mask_BRL[:, :, None, :].expand(B, R, G, W * S).reshape(B, 1, R * G, W * S)
    q_BKQD = q_THD.reshape(B, R, K, G, D).transpose(1, 2).reshape(B, K, R * G, D)
    o_BKQD = F.scaled_dot_product_attention(q_BKQD, k_BKLD, v_BKLD, attn_mask=mask_B1QL, scale=scale)
    return o_BKQD.reshape(B, K, R, G, D).transpose(1, 2).reshape(T, H, D)


def filter_floor(x_TV, top_k: int = 0, top_p: float = 1.0):
    """Per row the smallest value filter_logits keeps (-inf: no filter), fp32 [T]: the k-th value,
    or with top_p the smallest token whose mass strictly above it is below top_p (>= the k-th)."""
    floor = None
    if top_k and top_k < x_TV.shape[-1]:
        floor = torch.topk(x_TV, top_k, dim=-1).values[:, -1]
        if top_p < 1.0:
            x_TV = x_TV.masked_fill(x_TV < floor[:, None], float("-inf"))
    if top_p < 1.0:
        sorted_x, _ = torch.sort(x_TV, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        keep = before < top_p
        cut = torch.where(keep, sorted_x, torch.full_like(sorted_x, float("inf"))).amin(-1)
        floor = cut if floor is None else torch.maximum(floor, cut)  # top-k's mask stays where rounding keeps a -inf
    return torch.full(x_TV.shape[:1], float("-inf"), dtype=x_TV.dtype, device=x_TV.device) if floor is None else floor


def filter_logits(x_TV, top_k: int = 0, top_p: float = 1.0):
    """Mask (to -inf) tokens outside top-k / the top-p nucleus; fp32 in, fp32 out.

    Ties at the k-th value are kept. Rows are independent, so the mask a token gets does
    not depend on the batch (the sampler and the trainer apply this same function).
    """
    if not (top_k and top_k < x_TV.shape[-1]) and not top_p < 1.0:
        return x_TV
    return x_TV.masked_fill(x_TV < filter_floor(x_TV, top_k, top_p)[:, None], float("-inf"))


def logprobs(logits_TV, ids_T, temperature: float = 1.0, entropy: bool = False,
             top_k: int = 0, top_p: float = 1.0):
    x = filter_logits(_f32(logits_TV) / temperature, top_k, top_p)
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, ids_T[:, None].long())[:, 0]
    ent = None
    if entropy:
        p = logp_all.exp()
        ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, ent


def route_topk(logits_TE, k: int, norm_topk_prob: bool):
    probs = torch.softmax(_f32(logits_TE), dim=-1)
    # stable: sort descending with ties to the lower expert id
    w, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    w, ids = w[:, :k], ids[:, :k]
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def moe_combine(y_RD, pos_Tk, w_Tk):
    T, k = pos_Tk.shape
    y_TkD = y_RD[pos_Tk.reshape(-1)].view(T, k, -1)
    out = _f32(y_TkD[:, 0]) * _f32(w_Tk[:, 0, None])
    for j in range(1, k):
        out = out + _f32(y_TkD[:, j]) * _f32(w_Tk[:, j, None])
    return out.to(y_RD.dtype)


def grouped_linear(x_RK, w_ENK, group_sizes_E):
    outs = []
    start = 0
    for e, n in enumerate(group_sizes_E.tolist()):
        if n:
            outs.append(F.linear(x_RK[start: start + n], w_ENK[e]))
        start += n
    if not outs:
        return x_RK.new_zeros(0, w_ENK.shape[1])
    return torch.cat(outs)
