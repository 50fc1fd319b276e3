"""Public ops: dispatch on (mode, device) and autograd rules.

Forward: invariant mode runs the Triton kernel on CUDA and the tiled CPU implementation
on CPU; fast mode runs vendor kernels (cuBLAS, flash / SDPA: _ref) for matmuls and
attention (a linear by the invariant kernel where that timed faster at its shape: _fast_pick),
and on CUDA our Triton kernels for the row-wise ops, filter_logits and logprobs
(one launch instead of several torch ops; fast mode promises no bits), plain torch (_ref)
elsewhere or without Triton. The forward values are identical with and
without autograd. Backward uses an explicit rule (linear, logprobs, grouped_linear; the
row-wise ops and their fusions through _grads, in both modes) or, for attention, recomputes through _ref
(SDPA; kv_attention's packed training attention through flash's varlen kernels where torch
has them; our Triton kernels where they serve, MILES_ATTN_BWD=triton, the default); the backward
need not be invariant.

This module holds the row-wise ops, attention and MoE, and re-exports the rest: linear and
linears (_linear), filter_logits, logprobs and linear_logprobs (_logprobs); the packed training
attention's autograd is _train_attention, the dispatch and autograd wrappers _dispatch.
"""

from __future__ import annotations

import torch

from . import _cpu, _grads, _ref
from ._dispatch import _backend, _fast, _fast_kernels, _invariant, _needs_grad, _with_rule
from ._linear import linear, linears
from ._logprobs import filter_logits, linear_logprobs, logprobs
from ._train_attention import _PackedAttention, fast_packed_attention
from .meta import AttnMeta, write_kv

__all__ = ["add_rms_norm", "apply_rope", "attention", "filter_logits", "grouped_linear", "kv_attention", "linear",
           "linear_logprobs", "linears", "logprobs", "moe_combine", "moe_dispatch", "qk_norm_rope",
           "qk_norm_rope_kv_attention", "rms_norm", "rope_cos_sin", "route_topk", "silu_mul", "swiglu"]


# --- elementwise and norms --------------------------------------------------------------

def rms_norm(x, w, eps: float):
    """y = (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype) * w  (the HF cast order).

    x [..., D] any float dtype; statistics in fp32; the weight multiply in x's dtype.
    """
    if x.dim() != 2:  # 2-D in, 2-D out with no view: FSDP hooks a root module's output
        return rms_norm(x.reshape(-1, x.shape[-1]), w, eps).reshape(x.shape)
    return _with_rule(_grads.rms_norm, _row_impl(x, "rms_norm"), (x, w), (eps,))


class _AddRmsNorm(torch.autograd.Function):
    """(h, y) = (x + residual, rms_norm(h)); saves h, as rms_norm alone would. Backward: rms_norm's
    rule for y's grad, plus h's own grad (autograd's sum of h's two uses, unfused), to both inputs."""

    @staticmethod
    def forward(ctx, x, residual, w, eps, impl):
        h, y = impl(x, residual, w, eps)
        ctx.save_for_backward(h, w)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return h, y

    @staticmethod
    def backward(ctx, g_h, g_y):
        h, w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        add = g_h if need_h else None  # h's own grad, added to the norm's in its kernel (autograd's sum)
        g, gw = (None, None) if g_y is None else _grads.rms_norm((h, w), (ctx.eps,), g_y, (need_h, need_w), add)
        if g is None and add is not None:
            g = add
        return (g if ctx.needs_input_grad[0] else None), (g if ctx.needs_input_grad[1] else None), gw, None, None


def add_rms_norm(x, residual, w, eps: float):
    """(h, y) = (x + residual, rms_norm(h, w, eps)): a residual add and the norm after it, one
    kernel on CUDA, the bits of the two ops (`x + residual` in torch, then `rms_norm`).

    x, residual [..., D] of one shape; h in their dtype, y as rms_norm gives it. Where the dtypes
    differ (torch would promote) the two ops run as they are.
    """
    if x.shape != residual.shape:
        raise ValueError(f"miles_kernels add_rms_norm: x {list(x.shape)} and residual {list(residual.shape)} differ")
    if x.dtype != residual.dtype:
        h = x + residual
        return h, rms_norm(h, w, eps)
    if x.dim() != 2:  # 2-D in, 2-D out with no view: FSDP hooks a root module's output
        D = x.shape[-1]
        h, y = add_rms_norm(x.reshape(-1, D), residual.reshape(-1, D), w, eps)
        return h.reshape(x.shape), y.reshape(x.shape)
    if w.shape != (x.shape[-1],):
        raise ValueError(f"miles_kernels add_rms_norm: weight shape {list(w.shape)} does not match last dim "
                         f"{x.shape[-1]} of x")
    impl = _row_impl(x, "add_rms_norm")
    if _needs_grad(x, residual, w):
        return _AddRmsNorm.apply(x, residual, w, eps, impl)
    with torch.no_grad():
        return impl(x, residual, w, eps)


def _row_impl(x, name: str):
    """A row-wise op's forward: the invariant kernel, or fast mode's pick (_fast_kernels). Both
    modes take the closed-form backward (_grads): no autograd graph of fp32 temporaries."""
    return getattr(_fast_kernels(x) if _fast() else _backend(x), name)


def rope_cos_sin(pos_T, inv_freq_F, scale: float = 1.0):
    """RoPE tables for the given positions: (cos_TF, sin_TF) in fp32, F = head_dim // 2.

    f = pos.float() * inv_freq (fp32), then cos/sin (fp32) times the attention scale.
    On CUDA elementwise math is position-independent, so plain torch is invariant there.
    """
    if _fast() or pos_T.is_cuda:
        return _ref.rope_cos_sin(pos_T, inv_freq_F, scale)
    return _cpu.rope_cos_sin(pos_T, inv_freq_F, scale)


def apply_rope(x_THD, cos_TF, sin_TF):
    """Rotate-half (neox) RoPE: x1*c - x2*s, x2*c + x1*s in fp32, one rounding to x's dtype."""
    return _with_rule(_grads.apply_rope, _row_impl(x_THD, "apply_rope"), (x_THD, cos_TF, sin_TF))


def qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps: float):
    """(apply_rope(rms_norm(q, q_w, eps), cos, sin), apply_rope(rms_norm(k, k_w, eps), cos, sin)):
    Qwen3's per-head q/k norm then RoPE, both tensors in one kernel on CUDA, the bits of the four ops.

    q [T, H, D], k [T, K, D], weights [D], cos/sin fp32 [T, D/2] (rope_cos_sin); outputs in
    rms_norm's dtype (that of q and q_w as torch promotes them; bf16 for bf16 both).
    """
    _check_qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF)
    return _with_rule(_grads.qk_norm_rope, _row_impl(q_THD, "qk_norm_rope"),
                      (q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF), (eps,))


def _check_qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF) -> None:
    T, H, D = q_THD.shape
    if k_TKD.dim() != 3 or k_TKD.shape[0] != T or k_TKD.shape[2] != D or D % 2:
        raise ValueError(f"miles_kernels qk_norm_rope: q [T, H, D] = {list(q_THD.shape)} and k "
                         f"{list(k_TKD.shape)} must be [T, K, D] of one T and one even D")
    if q_w_D.shape != (D,) or k_w_D.shape != (D,):
        raise ValueError(f"miles_kernels qk_norm_rope: weights {list(q_w_D.shape)}, {list(k_w_D.shape)} must be [D={D}]")
    if cos_TF.shape != (T, D // 2) or sin_TF.shape != (T, D // 2):
        raise ValueError(f"miles_kernels qk_norm_rope: cos/sin must be [T, D/2] = [{T}, {D // 2}], got "
                         f"{list(cos_TF.shape)} and {list(sin_TF.shape)}")
    if cos_TF.dtype != torch.float32 or sin_TF.dtype != torch.float32:
        raise TypeError("miles_kernels qk_norm_rope: cos/sin tables must be fp32 (build them with mk.rope_cos_sin)")


def silu_mul(gate, up):
    """silu(gate) * up in fp32, one rounding to gate's dtype. Any leading dims."""
    lead = gate.shape[:-1]
    g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    y = _with_rule(_grads.silu_mul, _row_impl(gate, "silu_mul"), (g2, u2))
    return y.reshape(*lead, gate.shape[-1])


def swiglu(x, w_gate, w_up):
    """silu_mul(*linears(x, (w_gate, w_up))), the bits of those two ops: an MLP's gate and up
    projections and its activation. On CUDA outside autograd at decode sizes (rows <= the
    kernel's SMALL_M, bf16/fp16, in either mode) one kernel (miles_kernels._triton.fused_linears.swiglu):
    the gate and up products never reach memory. Elsewhere the two ops. Any leading dims."""
    if x.dim() != 2:
        return swiglu(x.reshape(-1, x.shape[-1]), w_gate, w_up).reshape(*x.shape[:-1], w_gate.shape[0])
    kernels = _swiglu_kernels(x, w_gate, w_up)
    if kernels is None:
        return silu_mul(*linears(x, (w_gate, w_up)))
    with torch.no_grad():
        return kernels.swiglu(x, w_gate, w_up)


def _swiglu_kernels(x, w_gate, w_up):
    """The Triton module whose swiglu kernel serves this call, or None (the two ops serve it)."""
    if not x.is_cuda or _needs_grad(x, w_gate, w_up) or not x.dtype == w_gate.dtype == w_up.dtype:
        return None
    kernels = _fast_kernels(x) if _fast() else _backend(x)
    if not hasattr(kernels, "swiglu"):
        return None
    return kernels if x.shape[0] <= kernels.matmul.SMALL_M and x.dtype in kernels.matmul.SMALL_M_TILES else None


# --- attention --------------------------------------------------------------------------

def attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, scale: float):
    """Causal GQA attention of packed queries over a paged KV cache.

    q [T, H, D]; caches [pages, page_size, K, D] with H % K == 0; the new tokens' K/V must
    already be in the cache (write_kv). Softmax in fp32, output in q's dtype. Invariant mode
    walks KV from position 0 in fixed steps (CPU: ATTN_BLOCK; Triton: 64 tokens, fixed
    256-token splits merged in order), so prefill, chunked prefill and decode give the same
    bits for the same token.
    """
    if _fast():
        if q_THD.is_cuda and not _needs_grad(q_THD, k_cache_PSKD, v_cache_PSKD):
            # SDPA cannot read pages: _ref gathers them into a padded copy per layer (and loops
            # over sequences to prefill), which costs more than the attention; the paged Triton
            # kernel reads them in place (the fast rows ran 0.37x invariant's at 0.6B b64 with
            # _ref's prefill, H200 2026-12-03)
            return _backend(q_THD).attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta.cu_seqlens_q, meta.kv_lens,
                                             meta.block_table, meta.max_q_len, scale)
        return _ref.attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta, scale)
    backend = _backend(q_THD)
    if backend is _cpu:
        inv = lambda q, k, v: _cpu.attention(q, k, v, meta, scale)  # noqa: E731
    else:
        inv = lambda q, k, v: backend.attention(  # noqa: E731
            q, k, v, meta.cu_seqlens_q, meta.kv_lens, meta.block_table, meta.max_q_len, scale)
    ref = lambda q, k, v: _ref.attention(q, k, v, meta, scale)  # noqa: E731
    return _invariant(ref, inv, (q_THD, k_cache_PSKD, v_cache_PSKD))


def kv_attention(q_THD, k_TKD, v_TKD, k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, slot_T, scale: float):
    """Store the new tokens' K/V at slot_T (write_kv), then `attention` over the cache.

    Whole sequences packed for training (meta.packed, from varlen_meta) take a path whose
    backward reads the packed q/k/v directly (flash varlen, else SDPA per sequence): no page
    gather, no grad through the cache, which is scratch space, written in place and reusable
    across layers. The forward is `attention`'s, bit for bit (on CUDA the kernel reads the
    packed K/V in place: packed_attention); fast mode runs the same kernels where our Triton
    backward serves (MILES_ATTN_BWD=triton, the default: faster than flash's both ways on an
    H200), else flash's (or SDPA's) on the packed tensors; where the kernel reads the packed
    K/V, the cache is not written. Otherwise (the
    engine, or a meta built by hand) the write is differentiable and `attention` runs as it is.
    """
    if meta.packed and _fast():
        out = fast_packed_attention(q_THD, k_TKD, v_TKD, meta, scale)
        if out is not None:
            return out
    backend = _backend(q_THD)
    direct = meta.packed and backend is not _cpu  # CUDA reads the packed K/V in place: the pages' bits

    def inv(q, k, v, lse_HT=None):
        if direct:  # the cache is scratch nobody reads here: no write
            return backend.packed_attention(q, k, v, meta.cu_seqlens_q, meta.max_q_len, scale, lse_HT=lse_HT)
        write_kv(k_cache_PSKD, v_cache_PSKD, k, v, slot_T)  # the cache holds what it always held
        if lse_HT is None:
            return attention(q, k_cache_PSKD, v_cache_PSKD, meta, scale)
        return backend.attention(q, k_cache_PSKD, v_cache_PSKD, meta.cu_seqlens_q, meta.kv_lens, meta.block_table,
                                 meta.max_q_len, scale, lse_HT=lse_HT)  # `attention`'s CUDA path, + LSE

    if not (meta.packed and _needs_grad(q_THD, k_TKD, v_TKD)):
        if direct:
            with torch.no_grad():
                return inv(q_THD, k_TKD, v_TKD)
        write_kv(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T)
        return attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta, scale)

    return _PackedAttention.apply(q_THD, k_TKD, v_TKD, inv, meta, scale)


def qk_norm_rope_kv_attention(q_THD, k_TKD, v_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps: float,
                              k_cache_PSKD, v_cache_PSKD, meta: AttnMeta, slot_T, scale: float):
    """kv_attention(*qk_norm_rope(q, k, q_w, k_w, cos, sin, eps), v, ...), bit for bit: Qwen3's
    q/k norm and RoPE, the new K/V stored at slot_T, attention over the cache. Where
    kv_attention would write the cache and read it (CUDA, a paged meta, outside autograd: the
    engine) the norm/RoPE kernel stores K and V itself (qk_norm_rope_write_kv): one launch
    and one K round trip fewer a layer."""
    _check_qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF)
    kernels = _norm_rope_cache_kernels(q_THD, k_TKD, v_TKD, q_w_D, k_w_D, k_cache_PSKD, v_cache_PSKD, meta, slot_T)
    if kernels is not None:
        with torch.no_grad():
            q_THD = kernels.qk_norm_rope_write_kv(q_THD, k_TKD, v_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps,
                                                  k_cache_PSKD, v_cache_PSKD, slot_T)
        return attention(q_THD, k_cache_PSKD, v_cache_PSKD, meta, scale)
    q_THD, k_TKD = qk_norm_rope(q_THD, k_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps)
    return kv_attention(q_THD, k_TKD, v_TKD, k_cache_PSKD, v_cache_PSKD, meta, slot_T, scale)


def _norm_rope_cache_kernels(q, k, v, q_w, k_w, k_cache, v_cache, meta, slot):
    """The Triton module whose one-launch norm/RoPE + K/V store serves this call, or None: where
    kv_attention writes the cache (not a packed meta) outside autograd, layouts write_kv's kernel
    takes, caches of k's and v's head shape, and k's cache in the dtype qk_norm_rope rounds k to
    (then one rounding is the two ops')."""
    if meta.packed or not q.is_cuda or _needs_grad(q, k, v, q_w, k_w, k_cache, v_cache):
        return None
    kernels = _fast_kernels(q) if _fast() else _backend(q)
    ok = (hasattr(kernels, "qk_norm_rope_write_kv") and k_cache.is_contiguous() and v_cache.is_contiguous()
          and k_cache.shape == v_cache.shape and k_cache.shape[2:] == k.shape[1:] and v.shape == k.shape
          and v.stride(-1) == 1 and slot.dtype in (torch.int32, torch.int64) and slot.shape == (k.shape[0],)
          and k_cache.dtype == torch.result_type(k, k_w))
    return kernels if ok else None


# --- MoE --------------------------------------------------------------------------------

def route_topk(router_logits_TE, k: int, norm_topk_prob: bool):
    """Top-k experts per token: (weights [T, k] fp32, ids [T, k] int64).

    softmax over experts in fp32, the k largest in descending order with ties to the lower
    expert id, renormalised to sum 1 when norm_topk_prob.
    """
    if _fast():
        return _ref.route_topk(router_logits_TE, k, norm_topk_prob)
    impl = _backend(router_logits_TE).route_topk
    if not _needs_grad(router_logits_TE):
        with torch.no_grad():
            return impl(router_logits_TE, k, norm_topk_prob)
    w, ids = impl(router_logits_TE.detach(), k, norm_topk_prob)
    return _RouteWeights.apply(router_logits_TE, ids, w, norm_topk_prob), ids


class _RouteWeights(torch.autograd.Function):
    """Weights from the invariant forward; gradient of the softmax (+ renorm) at fixed ids."""

    @staticmethod
    def forward(ctx, logits_TE, ids_Tk, w_Tk, norm):
        ctx.save_for_backward(logits_TE, ids_Tk)
        ctx.norm = norm
        return w_Tk

    @staticmethod
    def backward(ctx, g_Tk):
        logits, ids = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().float().requires_grad_(True)
            w = torch.softmax(x, -1).gather(-1, ids)
            if ctx.norm:
                w = w / w.sum(-1, keepdim=True)
            (gx,) = torch.autograd.grad(w, x, g_Tk)
        return gx.to(logits.dtype), None, None, None


def moe_combine(y_RD, pos_Tk, w_Tk):
    """A MoE layer's output: out[t] = sum_j w[t, j] * y[pos[t, j]] for the k slots j of token t.

    y [R, D] (the experts' rows), pos [T, k] int (the row of token t's j-th expert), w [T, k]
    (routing weights) -> [T, D] in y's dtype: products and sum in fp32, j ascending (on CUDA
    an explicit fma from j = 1), one rounding. A token's row reads only its own k rows. The
    backward gives each row of y the gradient of the one slot that reads it (a MoE's pos is a
    permutation of y's rows; rows no slot reads get 0).
    """
    if pos_Tk.dim() != 2 or w_Tk.shape != pos_Tk.shape or y_RD.dim() != 2:
        raise ValueError(f"miles_kernels moe_combine: y must be [R, D] and pos, w one [T, k]; got y "
                         f"{list(y_RD.shape)}, pos {list(pos_Tk.shape)}, w {list(w_Tk.shape)}")
    if pos_Tk.dtype.is_floating_point:
        raise TypeError(f"miles_kernels moe_combine: pos must be an integer tensor, got {pos_Tk.dtype}")
    return _with_rule(_grads.moe_combine, _row_impl(y_RD, "moe_combine"), (y_RD, pos_Tk, w_Tk))


class _MoeDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, order_R, pos_Tk):
        ctx.save_for_backward(pos_Tk)
        return x_TD.index_select(0, order_R // pos_Tk.shape[1])

    @staticmethod
    def backward(ctx, g_RD):
        (pos_Tk,) = ctx.saved_tensors
        kernels = _fast_kernels(g_RD)  # the Triton kernels for CUDA tensors where Triton imports
        if kernels is not _ref and _grads.MOE_BWD == "triton":
            return kernels.gather_sum(g_RD, pos_Tk), None, None
        T, k = pos_Tk.shape
        g_TkD = g_RD.index_select(0, pos_Tk.reshape(-1)).view(T, k, -1)
        return g_TkD.sum(1, dtype=torch.float32).to(g_RD.dtype), None, None


def moe_dispatch(x_TD, order_R, pos_Tk):
    """A MoE layer's expert rows: x_RD[r] = x_TD[order_R[r] // k], k = pos_Tk.shape[1].

    order_R [R = T*k] lists the (token, slot) pairs t * k + j in expert order; pos_Tk is its
    inverse (pos[t, j] = the row of pair (t, j)). A copy of rows, so exact. The backward sums a
    token's k row gradients in fp32 (a gather, no index accumulation; in slot order unless
    MILES_MOE_BWD=torch).
    """
    if pos_Tk.dim() != 2 or order_R.shape != (pos_Tk.numel(),) or x_TD.dim() != 2 or x_TD.shape[0] != pos_Tk.shape[0]:
        raise ValueError(f"miles_kernels moe_dispatch: x must be [T, D], pos [T, k] and order [T*k]; got x "
                         f"{list(x_TD.shape)}, order {list(order_R.shape)}, pos {list(pos_Tk.shape)}")
    if _needs_grad(x_TD):
        return _MoeDispatch.apply(x_TD, order_R, pos_Tk)
    return x_TD.index_select(0, order_R // pos_Tk.shape[1])


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RK, w_ENK, group_sizes_E, impl):
        ctx.save_for_backward(x_RK, w_ENK, group_sizes_E)
        return impl(x_RK, w_ENK, group_sizes_E)

    @staticmethod
    def backward(ctx, g_RN):
        x, w, sizes = ctx.saved_tensors
        if hasattr(torch, "_grouped_mm") and x.shape[1] % 8 == 0 and g_RN.shape[1] % 8 == 0:
            # torch's grouped GEMM (CUTLASS on sm90 for bf16; it wants 16-byte aligned rows): no
            # host sync, one launch per product instead of two per expert; the backward need
            # not be batch-invariant
            offs = torch.cumsum(sizes.to(g_RN.device, torch.int64), 0).to(torch.int32)
            g = g_RN.contiguous()
            gx = torch._grouped_mm(g, w.to(g.dtype), offs=offs).to(x.dtype) if ctx.needs_input_grad[0] else None
            gw = torch._grouped_mm(g.t(), x.to(g.dtype), offs=offs).to(w.dtype) if ctx.needs_input_grad[1] else None
            return gx, gw, None, None
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(sizes.tolist()):
            if n:
                g = g_RN[start: start + n]
                if gx is not None:
                    gx[start: start + n] = (g @ w[e].to(g.dtype)).to(x.dtype)
                if gw is not None:
                    gw[e] = (g.t() @ x[start: start + n].to(g.dtype)).to(w.dtype)
            start += n
        return gx, gw, None, None


def _grouped_mm_ok(x_RK, w_ENK) -> bool:
    # CUTLASS's grouped GEMM (sm90, bf16; 16-byte aligned rows)
    return (hasattr(torch, "_grouped_mm") and x_RK.is_cuda and x_RK.dtype == w_ENK.dtype == torch.bfloat16
            and x_RK.shape[1] % 8 == 0 and w_ENK.shape[1] % 8 == 0 and torch.cuda.get_device_capability(x_RK.device)[0] >= 9)


def _grouped_mm(x_RK, w_ENK, group_sizes_E):
    offs = torch.cumsum(group_sizes_E.to(x_RK.device, torch.int64), 0).to(torch.int32)
    return torch._grouped_mm(x_RK.contiguous(), w_ENK.transpose(1, 2), offs=offs)


def grouped_linear(x_RK, w_ENK, group_sizes_E):
    """Per-expert linear over rows sorted by expert: rows of group e use w[e] ([N, K]).

    x [R, K], w [E, N, K], group_sizes [E] int (sum R) -> [R, N] in x's dtype. Each row is
    computed like linear() computes it, independent of the other rows.
    """
    if _fast():
        if _grouped_mm_ok(x_RK, w_ENK):  # torch's grouped GEMM: one launch, no host sync
            return _GroupedLinear.apply(x_RK, w_ENK, group_sizes_E, _grouped_mm)
        return _ref.grouped_linear(x_RK, w_ENK, group_sizes_E)
    if x_RK.is_cuda:
        backend = _backend(x_RK)
        sizes = group_sizes_E.to(x_RK.device, torch.int64)
        offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int32, device=x_RK.device)
        offsets[1:] = torch.cumsum(sizes, 0)
        impl = lambda x, w, _s: backend.grouped_linear(x.contiguous(), w, offsets)  # noqa: E731
    else:
        impl = _cpu.grouped_linear
    if _needs_grad(x_RK, w_ENK):
        return _GroupedLinear.apply(x_RK, w_ENK, group_sizes_E, impl)
    with torch.no_grad():
        return impl(x_RK, w_ENK, group_sizes_E)
