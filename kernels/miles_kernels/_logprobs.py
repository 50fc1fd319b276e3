"""filter_logits, logprobs and linear_logprobs (the lm_head and logprobs fused over row chunks), with their
backward."""

from __future__ import annotations

import torch

from . import _cpu, _ref
from ._dispatch import _backend, _fast, _fast_kernels, _needs_grad
from ._linear import linear


def _filter_impl(x_TV):
    return _fast_kernels(x_TV) if _fast() else _backend(x_TV) if x_TV.is_cuda else _ref


def filter_logits(x_TV, top_k: int = 0, top_p: float = 1.0):
    """Mask (to -inf) the tokens outside top-k / the top-p nucleus of fp32 rows x (the
    temperature-scaled logits): keep the k largest (ties kept), then the tokens whose
    probability mass strictly above them is below top_p. Rows are independent and, in
    invariant mode, computed in a batch-invariant way (CUDA: a per-row Triton search, no
    sort), so the sampler and the trainer mask the same tokens whatever batch they are in."""
    return _filter_impl(x_TV).filter_logits(x_TV, top_k, top_p)


def _prefiltered(logits_TV, temperature: float, top_k: int, top_p: float):
    """(filter_logits(logits.float() / T), its floor [T]): the tokens under each row's floor are the
    mask, so the backward masks from the floor instead of filtering (top-k, top-p's cut) again."""
    x = logits_TV.float() / temperature  # a new tensor (the division): masked in place
    floor = _filter_impl(x).filter_floor(x, top_k, top_p)
    return x.masked_fill_(x < floor[:, None], float("-inf")), floor


def _keeps_floor(logits_TV, top_k: int, top_p: float) -> bool:
    """Whether the logprobs' autograd filters once and keeps the floor for the backward: CUDA rows
    with a filter (CPU rows are filtered a tile at a time, with no [T, V] fp32 copy)."""
    return logits_TV.is_cuda and bool(top_k or top_p < 1.0)


def _logprobs_keeping_floor(impl, logits_TV, ids_T, temperature, entropy, top_k, top_p):
    """impl's (logp, entropy, lse) and, where _keeps_floor, the filter's floor (else None): the rows
    filtered here once, impl run on them at T = 1 without a filter (what it runs after filtering)."""
    if not _keeps_floor(logits_TV, top_k, top_p):
        return (*impl(logits_TV, ids_T, temperature, entropy, top_k, top_p), None)
    z, floor = _prefiltered(logits_TV, temperature, top_k, top_p)
    return (*impl(z, ids_T, 1.0, entropy, 0, 1.0), floor)


_BWD_ROWS = 1024  # rows per fp32 chunk in the logprobs backward


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, ids_T, temperature, entropy, top_k, top_p, impl):
        logp, ent, lse, floor = _logprobs_keeping_floor(impl, logits_TV, ids_T, temperature, entropy, top_k, top_p)
        ctx.save_for_backward(logits_TV, ids_T, lse, ent if ent is not None else lse,
                              floor if floor is not None else lse)
        ctx.cfg, ctx.has_floor = (temperature, entropy, top_k, top_p), floor is not None
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, ids, lse, ent, floor = ctx.saved_tensors
        grad = torch.empty_like(logits)
        _fill_logprobs_grad(grad, logits, ids, lse, ent, g_logp, g_ent, ctx.cfg, floor if ctx.has_floor else None)
        return grad, None, None, None, None, None, None


def _rows(t, sl):
    return None if t is None else t[sl]


def _fill_logprobs_grad(grad, logits, ids, lse, ent, g_logp, g_ent, cfg, floor=None):
    """grad[:] = _logprobs_grad of all the rows: one kernel launch on CUDA without top-k/top-p,
    else _BWD_ROWS rows at a time (bounds the fp32 temporaries of the filter and the torch rule).
    floor: the forward's filter floors (_prefiltered), else the filter runs again."""
    top_k, top_p = cfg[2:]
    one_pass = logits.is_cuda and not (top_k or top_p < 1.0)
    step = max(1, logits.shape[0]) if one_pass else _BWD_ROWS
    for i in range(0, logits.shape[0], step):
        sl = slice(i, i + step)
        _logprobs_grad(logits[sl], ids[sl], lse[sl], ent[sl], _rows(g_logp, sl), _rows(g_ent, sl), *cfg, out=grad[sl],
                       floor=_rows(floor, sl))


def _masked(logits, temperature, top_k, top_p, floor):
    """The forward's filtered fp32 logits / T: from its floors where kept, else filtered again."""
    x = logits.float() / temperature  # a new tensor (the division): masked in place
    return filter_logits(x, top_k, top_p) if floor is None else x.masked_fill_(x < floor[:, None], float("-inf"))


def _logprobs_grad(logits, ids, lse, ent, g_logp, g_ent, temperature, entropy, top_k, top_p, out=None, floor=None):
    """d(loss)/d(logits) for rows of logits, given the output grads of (logp, entropy), in
    logits' dtype (written into `out` when given). CUDA: one elementwise kernel pass."""
    if logits.is_cuda:
        out = torch.empty_like(logits) if out is None else out
        z, t_in = logits, temperature
        if top_k or top_p < 1.0:  # the forward's mask on the fp32 logits / T, read by the kernel at T = 1
            z, t_in = _masked(logits, temperature, top_k, top_p, floor), 1.0
        return _backend(logits).logprobs_grad(z, ids, lse, ent, g_logp, g_ent if entropy else None, t_in,
                                              temperature, out)
    x = _masked(logits, temperature, top_k, top_p, floor)  # the forward's mask
    p = torch.exp(x - lse[:, None])
    g = torch.zeros_like(p)
    if g_logp is not None:
        # a masked id (logp = -inf) gets no one-hot term, as in the reference
        gl = torch.where(x.gather(-1, ids[:, None].long()) > float("-inf"), g_logp[:, None], 0.0)
        g = -p * g_logp[:, None]
        g.scatter_add_(-1, ids[:, None].long(), gl)
    if entropy and g_ent is not None:
        # dH/dx_j = -p_j (log p_j + H); masked tokens (p = 0) get 0
        logp_all = torch.where(p > 0, x - lse[:, None], torch.zeros_like(x))
        g = g - g_ent[:, None] * p * (logp_all + ent[:, None])
    g = (g / temperature).to(logits.dtype)
    return g if out is None else out.copy_(g)


def logprobs(logits_TV, ids_T, temperature: float = 1.0, entropy: bool = False,
             top_k: int = 0, top_p: float = 1.0):
    """Log-probabilities of ids under softmax(filter(logits / temperature)), and entropy.

    logits [T, V] (bf16 or fp32), ids [T] -> (logp [T] fp32, entropy [T] fp32 or None).
    fp32 math one row tile at a time: no full fp32 copy of the logits. top_k/top_p mask
    the same tokens the sampler masks, so the logprob is of the distribution sampled from.
    The sampler and the trainer both call this one function.
    """
    if temperature <= 0:
        raise ValueError(f"logprobs: temperature must be > 0 (got {temperature}); "
                         "greedy decoding records logprobs at temperature 1")
    impl = _logprobs_impl(logits_TV)
    if _needs_grad(logits_TV):
        return _Logprobs.apply(logits_TV, ids_T, temperature, entropy, top_k, top_p, impl)
    with torch.no_grad():
        logp, ent, _ = impl(logits_TV, ids_T, temperature, entropy, top_k, top_p)
    return logp, ent


def _logprobs_impl(logits_TV):
    if _fast():
        return _fast_logprobs if _fast_kernels(logits_TV) is _ref else _cuda_logprobs
    return _cuda_logprobs if logits_TV.is_cuda else _cpu.logprobs


LINEAR_LOGPROBS_ROWS = 4096  # rows of logits alive at once in linear_logprobs
# With autograd on CUDA, a call's forward logits stay for its backward (no recomputed lm_head) while
# they fit in this fraction of the device's memory (the 0.6B's 16k tokens x 151,936: 4.6 GiB of an
# H200's 140); above it the backward recomputes each chunk's logits. The same bits either way.
LINEAR_LOGPROBS_KEEP = 0.04


def linear_logprobs(x_TD, w_VD, ids_T, temperature: float = 1.0, entropy: bool = False,
                    top_k: int = 0, top_p: float = 1.0, chunk_rows: int = LINEAR_LOGPROBS_ROWS,
                    keep_bytes: int | None = None):
    """logprobs(linear(x, w), ids, ...) without materialising the [T, V] logits at once: the
    lm_head and the log-softmax run `chunk_rows` rows at a time. Same values as the two calls,
    bit for bit: both ops are row-wise invariant, so chunking rows changes nothing. Gradients:
    x in x's dtype, w accumulated in fp32 over chunks, then w's dtype. The backward reuses the
    forward's logits chunks while they total at most keep_bytes (None: LINEAR_LOGPROBS_KEEP of
    the device's memory on CUDA, 0 on the CPU), else recomputes them: the same grads bit for bit.
    """
    if temperature <= 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0 (got {temperature})")
    if chunk_rows < 1:
        raise ValueError(f"linear_logprobs: chunk_rows must be >= 1 (got {chunk_rows})")
    if _needs_grad(x_TD, w_VD):
        if keep_bytes is None:
            keep_bytes = int(LINEAR_LOGPROBS_KEEP * torch.cuda.get_device_properties(x_TD.device).total_memory) \
                if x_TD.is_cuda else 0
        keep = x_TD.shape[0] * w_VD.shape[0] * x_TD.element_size() <= keep_bytes
        return _LinearLogprobs.apply(x_TD, w_VD, ids_T, temperature, entropy, top_k, top_p, chunk_rows, keep)
    with torch.no_grad():
        logp, ent, _, _ = _linear_logprobs_fwd(x_TD, w_VD, ids_T, temperature, entropy, top_k, top_p, chunk_rows)
    return logp, ent


def _linear_logprobs_fwd(x_TD, w_VD, ids_T, temperature, entropy, top_k, top_p, chunk_rows, keep=False,
                         floors=None):
    """(logp, entropy or None, lse, the chunks' logits if keep else []); with a list `floors`, CUDA
    chunks with a filter are filtered here once and their floors appended to it (_prefiltered)."""
    outs, kept = [], []
    for i in range(0, x_TD.shape[0], chunk_rows):
        logits = linear(x_TD[i: i + chunk_rows], w_VD)
        ids, impl = ids_T[i: i + chunk_rows], _logprobs_impl(logits)
        if floors is None:
            logp, ent, lse = impl(logits, ids, temperature, entropy, top_k, top_p)
        else:
            logp, ent, lse, floor = _logprobs_keeping_floor(impl, logits, ids, temperature, entropy, top_k, top_p)
            if floor is not None:
                floors.append(floor)
        outs.append((logp, ent if entropy else lse, lse))
        if keep:
            kept.append(logits)
    if not outs:
        empty = x_TD.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None), empty, kept
    logp, ent, lse = (torch.cat(t) for t in zip(*outs))
    return logp, (ent if entropy else None), lse, kept


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_VD, ids_T, temperature, entropy, top_k, top_p, chunk_rows, keep):
        floors: list[torch.Tensor] = []
        with torch.no_grad():
            logp, ent, lse, kept = _linear_logprobs_fwd(x_TD, w_VD, ids_T, temperature, entropy, top_k, top_p,
                                                        chunk_rows, keep, floors)
        ctx.has_floor = bool(floors)  # every chunk's or none (one device, one filter)
        floor = torch.cat(floors) if floors else lse
        ctx.save_for_backward(x_TD, w_VD, ids_T, lse, ent if ent is not None else lse, floor, *kept)
        ctx.cfg = (temperature, entropy, top_k, top_p)
        ctx.chunk_rows = chunk_rows
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, w, ids, lse, ent, floor, *kept = ctx.saved_tensors
        floor = floor if ctx.has_floor else None
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for n, i in enumerate(range(0, x.shape[0], ctx.chunk_rows)):
            sl = slice(i, i + ctx.chunk_rows)
            if kept:
                logits = kept[n]
            else:
                with torch.no_grad():
                    logits = linear(x[sl], w)  # the forward's logits again
            g = torch.empty_like(logits)
            _fill_logprobs_grad(g, logits, ids[sl], lse[sl], ent[sl], _rows(g_logp, sl), _rows(g_ent, sl), ctx.cfg,
                                _rows(floor, sl))
            if gx is not None:
                gx[sl] = g @ w.to(g.dtype)
            if gw is not None:
                _add_product(gw, g.t(), x[sl].to(g.dtype))
        return gx, (gw.to(w.dtype) if gw is not None else None), None, None, None, None, None, None, None


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. On CUDA with 16-bit a, b: one GEMM that adds its fp32 products into
    acc (cuBLAS's beta = 1), no rounding of each chunk's product to 16 bits and no separate add
    pass over acc (the lm_head's weight grad at a 151,936 vocabulary: 0.6 GB of fp32 a chunk)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


def _fast_logprobs(logits_TV, ids_T, temperature, entropy, top_k, top_p):
    """Plain torch over row chunks: fast mode never holds an fp32 copy of all the logits either."""
    outs = []
    for i in range(0, logits_TV.shape[0], _BWD_ROWS):
        x = _ref.filter_logits(logits_TV[i: i + _BWD_ROWS].float() / temperature, top_k, top_p)
        lse = torch.logsumexp(x, -1)
        logp = x.gather(-1, ids_T[i: i + _BWD_ROWS, None].long())[:, 0] - lse
        p = torch.exp(x - lse[:, None])
        ent = lse - torch.where(p > 0, p * x, torch.zeros_like(x)).sum(-1) if entropy else torch.zeros_like(lse)
        outs.append((logp, ent, lse))
    logp, ent, lse = (torch.cat(t) for t in zip(*outs)) if outs else (logits_TV.new_zeros(0, dtype=torch.float32),) * 3
    return logp, (ent if entropy else None), lse


def _cuda_logprobs(logits_TV, ids_T, temperature, entropy, top_k, top_p):
    logp, ent, lse = _backend(logits_TV).logprobs(logits_TV, ids_T, temperature, top_k, top_p)
    return logp, (ent if entropy else None), lse
