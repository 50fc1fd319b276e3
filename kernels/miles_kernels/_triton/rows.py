"""Per-row reductions over a vocabulary or expert axis: logprobs, the top-k / top-p filter (its
top-p cut: top_p.py) and route_topk.

A row is walked in fixed chunks (logprobs: in fixed parts of chunks, one program each, the
parts' states merged in order), so its reduction order never depends on the number of rows.
Logits are read in their own dtype and upcast chunk by chunk: no fp32 copy of a [T, V]
tensor is ever made.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch
from miles_kernels._triton.cut import top_k_floor, top_p_cutoff


LOGPROB_CHUNK = 4096  # vocab entries per step of the online max / sum-exp walk
# A row's vocabulary in fixed parts of this many entries (a multiple of LOGPROB_CHUNK), one
# program each, their states merged in order: a 151,936 vocab is 10 parts, so a decode-sized
# batch keeps the GPU busy (one program a row was latency-bound: 57 us for 64 rows).
LOGPROB_PART = 4 * LOGPROB_CHUNK


@triton.jit
def _lp_shift(m, s, m_new):
    """(shift, alpha) that move a state (max m, sum s) to the max m_new: shift 0 for an empty state."""
    shift = tl.where(s > 0.0, m - m_new, 0.0)
    return shift, tl.exp(shift)


@fast_launch
@triton.jit
def _logprobs_part_kernel(logits_ptr, state_ptr, V, stride_t, n_parts, temperature,
                          PART: tl.constexpr, CHUNK: tl.constexpr, SCALED: tl.constexpr):
    # State of part p of a row, in units of z = logits / T, shifted by the running max m:
    #   s = sum exp(z - m),  w = sum exp(z - m) * (z - m)   (entropy = log s - w / s)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    base = logits_ptr + row * stride_t
    cols = tl.arange(0, CHUNK)
    v_hi = tl.minimum(part * PART + PART, V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for v0 in range(part * PART, v_hi, CHUNK):
        z = tl.load(base + v0 + cols, mask=v0 + cols < v_hi, other=float("-inf")).to(tl.float32)
        if SCALED:  # else T = 1: z / 1 is z exactly, and the division is a fifth of the loop's work
            z = z / temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        # every logit so far masked (top-k/top-p): m_new = -inf and z - m_new would be nan;
        # shifting by 0 instead gives e = 0 and leaves the state empty
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(z - m_sub)
        zc = tl.where(e > 0.0, e * (z - m_sub), 0.0)
        shift, alpha = _lp_shift(m, s, m_new)  # on the first chunk s == 0 and m == -inf
        w = alpha * (w + shift * s) + tl.sum(zc, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    out = state_ptr + (row * n_parts + part) * 3
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, w)


@fast_launch
@triton.jit
def _logprobs_kernel(logits_ptr, ids_ptr, state_ptr, logp_ptr, ent_ptr, lse_ptr, T, n_parts, stride_t, temperature,
                     ROWS: tl.constexpr, SCALED: tl.constexpr):
    """Merge each row's part states in order (from an empty state), then logp, entropy, lse."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < T
    st = state_ptr + rows.to(tl.int64) * n_parts * 3
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    w = tl.zeros((ROWS,), tl.float32)
    for _ in range(0, n_parts):
        m_p = tl.load(st, mask=ok, other=float("-inf"))
        s_p = tl.load(st + 1, mask=ok, other=0.0)
        w_p = tl.load(st + 2, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_p)
        shift, alpha = _lp_shift(m, s, m_new)
        shift_p, alpha_p = _lp_shift(m_p, s_p, m_new)
        w = alpha * (w + shift * s) + alpha_p * (w_p + shift_p * s_p)
        s = alpha * s + alpha_p * s_p
        m = m_new
        st += 3
    log_s = tl.log(s)
    lse = m + log_s
    tok = tl.load(ids_ptr + rows, mask=ok, other=0)
    z_tok = tl.load(logits_ptr + rows.to(tl.int64) * stride_t + tok, mask=ok, other=0.0).to(tl.float32)
    if SCALED:
        z_tok = z_tok / temperature
    tl.store(logp_ptr + rows, z_tok - lse, mask=ok)
    tl.store(ent_ptr + rows, log_s - w / s, mask=ok)
    tl.store(lse_ptr + rows, lse, mask=ok)


_MERGE_ROWS = 64


def logprobs(
    logits_TV: torch.Tensor, ids_T: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp_T, entropy_T, lse_T), all fp32, of log_softmax(filter(logits.float() / temperature)) at ids.

    `filter` (top-k / top-p, miles_kernels.filter_logits) acts on the temperature-scaled
    logits, as the sampler's does; the kernel then runs on the filtered fp32 rows at T = 1.
    """
    T, V = logits_TV.shape
    if ids_T.shape != (T,):
        raise ValueError(f"miles_kernels logprobs: ids shape {list(ids_T.shape)} must be [T]=[{T}] for logits [T, V]")
    if not temperature > 0:
        raise ValueError(f"miles_kernels logprobs: temperature must be > 0, got {temperature}")
    if top_k or top_p < 1.0:
        logits_TV, temperature = filter_logits(logits_TV.float() / temperature, top_k, top_p), 1.0
    if logits_TV.stride(-1) != 1:
        logits_TV = logits_TV.contiguous()
    out = torch.empty((3, T), dtype=torch.float32, device=logits_TV.device)
    if T > 0:
        n_parts = max(triton.cdiv(V, LOGPROB_PART), 1)
        states = torch.empty((T, n_parts, 3), dtype=torch.float32, device=logits_TV.device)
        _logprobs_part_kernel[(T, n_parts)](
            logits_TV, states, V, logits_TV.stride(0), n_parts, float(temperature),
            PART=LOGPROB_PART, CHUNK=LOGPROB_CHUNK, SCALED=temperature != 1.0, num_warps=8,
        )
        _logprobs_kernel[(triton.cdiv(T, _MERGE_ROWS),)](
            logits_TV, ids_T.contiguous(), states, out[0], out[1], out[2], T, n_parts, logits_TV.stride(0),
            float(temperature), ROWS=_MERGE_ROWS, SCALED=temperature != 1.0, num_warps=2,
        )
    return out[0], out[1], out[2]


# The k-th value by cut.top_k_floor (the cut's search with counts) in place of torch.topk: the same
# values (both exact selections). H100 (forty-first run, filter.py --cut-only --logits lm, top-k 20, the
# snapped cut): 0.318 / 0.565 / 1.093 / 4.03 / 15.49 ms at 64 / 128 / 256 / 1,024 / 4,096 rows against
# torch.topk's 0.363 / 0.718 / 1.188 / 4.10 / 15.84 (unsnapped, thirty-eighth run: slower from 256 rows).
TOPK_BY_CUT = True


def filter_floor(x_TV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Per row of fp32 x the smallest value the top-k / top-p filter keeps: the k-th value (a
    selection: exact; TOPK_BY_CUT), or with top_p the `top_p_cutoff` of the top-k-masked row, which is a kept
    value and so >= the k-th. Every token under its row's floor is masked, none above: one [T]
    tensor says the whole mask (the trainer keeps it from forward to backward)."""
    floor = None
    if top_k and top_k < x_TV.shape[-1]:
        floor = (top_k_floor(x_TV.float(), top_k) if TOPK_BY_CUT
                 else torch.topk(x_TV, top_k, dim=-1).values[:, -1].float())
        if top_p < 1.0:
            x_TV = x_TV.masked_fill(x_TV < floor[:, None], float("-inf"))
    if top_p < 1.0:
        cut = top_p_cutoff(x_TV, top_p)
        floor = cut if floor is None else torch.maximum(floor, cut)
    return torch.full(x_TV.shape[:1], float("-inf"), device=x_TV.device) if floor is None else floor


def filter_logits(x_TV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The top-k / top-p mask of fp32 rows, batch-invariant on the GPU: the tokens under
    `filter_floor` at -inf. Same rule as the CPU filter."""
    if not (top_k and top_k < x_TV.shape[-1]) and not top_p < 1.0:
        return x_TV
    return x_TV.masked_fill(x_TV < filter_floor(x_TV, top_k, top_p)[:, None], float("-inf"))


@fast_launch
@triton.jit
def _route_topk_kernel(
    logits_ptr, w_ptr, ids_ptr, E, stride_t,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    es = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + row * stride_t + es, mask=es < E, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, 0))
    p = e / tl.sum(e, 0)
    p = tl.where(es < E, p, -1.0)  # probabilities are >= 0, so -1 marks "not selectable"
    ks = tl.arange(0, K_PAD)
    w_K = tl.zeros((K_PAD,), tl.float32)
    id_K = tl.zeros((K_PAD,), tl.int64)
    for i in tl.static_range(TOPK):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, es, E_PAD), 0)  # ties go to the lower expert id
        w_K = tl.where(ks == i, best, w_K)
        id_K = tl.where(ks == i, idx.to(tl.int64), id_K)
        p = tl.where(es == idx, -1.0, p)
    if NORM:
        w_K = w_K / tl.sum(w_K, 0)
    tl.store(w_ptr + row * TOPK + ks, w_K, mask=ks < TOPK)
    tl.store(ids_ptr + row * TOPK + ks, id_K, mask=ks < TOPK)


def route_topk(router_logits_TE: torch.Tensor, k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(router_logits.float()) then top-k (ties -> lower id), renormalised if asked: (w_Tk fp32, ids_Tk int64)."""
    T, E = router_logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"miles_kernels route_topk: k={k} must be in [1, num_experts={E}]")
    if router_logits_TE.stride(-1) != 1:
        router_logits_TE = router_logits_TE.contiguous()
    w_Tk = torch.empty((T, k), dtype=torch.float32, device=router_logits_TE.device)
    ids_Tk = torch.empty((T, k), dtype=torch.int64, device=router_logits_TE.device)
    if T > 0:
        _route_topk_kernel[(T,)](
            router_logits_TE, w_Tk, ids_Tk, E, router_logits_TE.stride(0),
            TOPK=k, K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(E), NORM=bool(norm_topk_prob),
            num_warps=4,
        )
    return w_Tk, ids_Tk
