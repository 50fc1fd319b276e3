"""CPU implementations that are batch-invariant by construction.

CPU BLAS and ATen pick kernels, thread splits and vector/scalar code paths from a call's
shape (gemv below some M, a reduction split across threads when there are few rows, a
scalar tail after the vector loop). So every op here runs on tiles of one fixed shape:

- matmuls: row tiles of ``CPU_ROW_TILE`` rows (the last one zero-padded), one ``mm`` per
  tile, so BLAS always sees the same (M, K, N);
- elementwise and row-reduction work: tiles of ``_rows_per_tile(D)`` rows with the last dim
  padded to a multiple of 64, small enough (<= ATen's grain size) to run on one thread,
  so every element takes the vector loop and every row reduces in the same order;
- attention: query tiles aligned to absolute positions (a query at position p is always
  row p % ATTN_BLOCK of its tile), KV walked in ATTN_BLOCK blocks from position 0, so a
  token's output is the same in prefill, chunked prefill and decode.

Forward only: ops.py gives them autograd rules.
"""

from __future__ import annotations

import math

import torch

from . import _ref
from .meta import AttnMeta

CPU_ROW_TILE = 32   # rows per BLAS call; fixed so BLAS always sees one shape
ATTN_BLOCK = 16     # KV block walked by attention, and the query tile height
_GRAIN = 32768      # at::internal::GRAIN_SIZE: ATen runs smaller calls on one thread
_COL_PAD = 64       # 2 x AVX-512 floats: rows then start on a vector-loop boundary


def _rows_per_tile(cols: int) -> int:
    """A power of two, so a (rows,) vector is either all vector loop or all scalar tail."""
    rows = max(1, _GRAIN // cols)
    return 1 << (rows.bit_length() - 1)


def _pad_rows(x, rows: int):
    pad = (-x.shape[0]) % rows
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


def _pad_cols(x, value: float = 0.0):
    pad = (-x.shape[-1]) % _COL_PAD
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def _over_row_tiles(fn, rows: int, *xs):
    """fn over fixed-shape row tiles of the 2-D tensors xs; outputs concatenated, unpadded."""
    M = xs[0].shape[0]
    # no rows: one tile of padding still runs, so the outputs get their shapes and dtypes
    padded = [_pad_rows(x, rows) if M else x.new_zeros(rows, *x.shape[1:]) for x in xs]
    outs = None
    for i in range(0, padded[0].shape[0], rows):
        got = fn(*(x[i: i + rows] for x in padded))
        got = got if isinstance(got, tuple) else (got,)
        if outs is None:  # fresh tensors, not views of a padded buffer (FSDP hooks outputs)
            outs = tuple(g.new_empty(M, *g.shape[1:]) for g in got)
        n = min(rows, M - i)
        for o, g in zip(outs, got):
            o[i: i + n] = g[:n]
    return outs if len(outs) > 1 else outs[0]


def linear(x_MK, w_NK, b_N=None):
    M, K = x_MK.shape
    if M == 0:
        return x_MK.new_zeros(0, w_NK.shape[0])
    w_KN = w_NK.t()
    y = _over_row_tiles(lambda t: t @ w_KN, CPU_ROW_TILE, x_MK.contiguous())
    return y + b_N if b_N is not None else y


def rms_norm(x_MD, w_D, eps: float):
    D = x_MD.shape[-1]

    def tile(x):
        xf = x.float()
        ms = _pad_cols(xf * xf).sum(-1, keepdim=True) / D
        return (xf * (1.0 / torch.sqrt(ms + eps))).to(x.dtype)

    return _over_row_tiles(tile, _rows_per_tile(D + _COL_PAD), x_MD) * w_D


def add_rms_norm(x_MD, r_MD, w_D, eps: float):
    """(x + r, rms_norm(x + r)): the two ops as they are (the fusion saves launches on CUDA, not here)."""
    h = x_MD + r_MD
    return h, rms_norm(h, w_D, eps)


def rope_cos_sin(pos_T, inv_freq_F, scale: float = 1.0):
    F_ = inv_freq_F.shape[0]

    def tile(p):
        f = _pad_cols(p.float() * inv_freq_F.float()[None, :])  # p is a [rows, 1] tile
        return f.cos()[:, :F_] * scale, f.sin()[:, :F_] * scale

    return _over_row_tiles(tile, _rows_per_tile(F_ + _COL_PAD), pos_T[:, None])


def silu_mul(gate_MF, up_MF):
    F_ = gate_MF.shape[-1]

    def tile(g, u):
        gf = _pad_cols(g.float())
        return (gf * torch.sigmoid(gf))[:, :F_] * u.float()

    return _over_row_tiles(tile, _rows_per_tile(F_ + _COL_PAD), gate_MF, up_MF).to(gate_MF.dtype)


def apply_rope(x_THD, cos_TF, sin_TF):
    # only + and *: IEEE-exact elementwise ops give the same bits in any code path
    return _ref.apply_rope(x_THD, cos_TF, sin_TF)


def qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps: float):
    """apply_rope(rms_norm(x, w)) of q and of k, the head rows normed as ops.rms_norm hands them over."""
    D = q_THD.shape[-1]

    def one(x, w):
        return apply_rope(rms_norm(x.reshape(-1, D), w, eps).reshape(x.shape), cos_TF, sin_TF)

    return one(q_THD, q_w_D), one(k_TKD, k_w_D)


def logprobs(logits_TV, ids_T, temperature=1.0, entropy=False, top_k=0, top_p=1.0):
    """(logp_T, entropy_T | None, lse_T) in fp32; one fp32 tile of rows at a time."""
    V = logits_TV.shape[-1]

    def tile(x, ids):
        xf = x.float() / temperature
        if top_k or top_p < 1.0:  # on the unpadded row, as the sampler's filter_logits sees it
            xf = _ref.filter_logits(xf, top_k, top_p)
        xf = _pad_cols(xf, float("-inf"))
        m = xf.amax(-1, keepdim=True)
        e = torch.exp(xf - m)
        s = e.sum(-1, keepdim=True)
        lse = m + torch.log(s)
        logp = xf.gather(-1, ids.long()) - lse
        if entropy:
            ex = torch.where(e > 0, e * xf, torch.zeros_like(e)).sum(-1, keepdim=True)
            ent = lse - ex / s
        else:
            ent = torch.zeros_like(lse)
        return logp[:, 0], ent[:, 0], lse[:, 0]

    logp, ent, lse = _over_row_tiles(tile, _rows_per_tile(V + _COL_PAD), logits_TV, ids_T[:, None])
    return logp, (ent if entropy else None), lse


def route_topk(logits_TE, k: int, norm_topk_prob: bool):
    E = logits_TE.shape[-1]

    def tile(x):
        xf = _pad_cols(x.float(), float("-inf"))
        e = torch.exp(xf - xf.amax(-1, keepdim=True))
        probs = e / e.sum(-1, keepdim=True)
        w, ids = torch.sort(probs[:, :E], dim=-1, descending=True, stable=True)
        w, ids = w[:, :k], ids[:, :k]
        if norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w, ids

    return _over_row_tiles(tile, _rows_per_tile(E + _COL_PAD), logits_TE)


# fp32 products and sums of whole rows, slot by slot: elementwise, so invariant as it is
moe_combine = _ref.moe_combine


def grouped_linear(x_RK, w_ENK, group_sizes_E):
    outs, start = [], 0
    for e, n in enumerate(group_sizes_E.tolist()):
        if n:
            outs.append(linear(x_RK[start: start + n], w_ENK[e]))
        start += n
    return torch.cat(outs) if outs else x_RK.new_zeros(0, w_ENK.shape[1])


def attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, scale: float):
    T, H, D = q_THD.shape
    S, K = k_cache_PSKD.shape[1], k_cache_PSKD.shape[2]
    B = ATTN_BLOCK
    out = torch.empty_like(q_THD)
    cu, kv_lens = meta.host_lists()
    for b, L in enumerate(kv_lens):
        q0, q1 = cu[b], cu[b + 1]
        if q1 == q0:
            continue
        start = L - (q1 - q0)
        pages = meta.block_table[b, : (L + S - 1) // S]
        n_blocks = (L + B - 1) // B
        k_HLD = _ref.gather_kv(k_cache_PSKD, pages, L).float().transpose(0, 1)
        v_HLD = _ref.gather_kv(v_cache_PSKD, pages, L).float().transpose(0, 1)
        k_HLD = _pad_seq(k_HLD.repeat_interleave(H // K, dim=0), n_blocks * B)
        v_HLD = _pad_seq(v_HLD.repeat_interleave(H // K, dim=0), n_blocks * B)
        q_HTD = q_THD[q0:q1].float().transpose(0, 1)
        for t in range(start // B, n_blocks):
            lo, hi = max(start, t * B), min(L, (t + 1) * B)
            q_tile = q_HTD.new_zeros(H, B, D)
            q_tile[:, lo - t * B: hi - t * B] = q_HTD[:, lo - start: hi - start]
            o_tile = _attend_tile(q_tile, k_HLD, v_HLD, t, scale)
            out[q0 + lo - start: q0 + hi - start] = o_tile[:, lo - t * B: hi - t * B].transpose(0, 1).to(out.dtype)
    return out


def _pad_seq(x_HLD, length: int):
    pad = length - x_HLD.shape[1]
    return torch.nn.functional.pad(x_HLD, (0, 0, 0, pad)) if pad else x_HLD


_causal_cache: dict = {}


def _attend_tile(q_HBD, k_HLD, v_HLD, t: int, scale: float):
    """Online softmax of one query tile (block t) over KV blocks 0..t, fp32, fixed shapes."""
    B = ATTN_BLOCK
    H = q_HBD.shape[0]
    if B not in _causal_cache:
        _causal_cache[B] = torch.ones(B, B, dtype=torch.bool).tril().logical_not()
    future_BB = _causal_cache[B]
    m = q_HBD.new_full((H, B, 1), float("-inf"))
    l = q_HBD.new_zeros(H, B, 1)
    acc = torch.zeros_like(q_HBD)
    for j in range(t + 1):
        s = torch.bmm(q_HBD, k_HLD[:, j * B: (j + 1) * B].transpose(1, 2)) * scale
        if j == t:
            s = s.masked_fill(future_BB, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p, v_HLD[:, j * B: (j + 1) * B])
        m = m_new
    return acc / l
