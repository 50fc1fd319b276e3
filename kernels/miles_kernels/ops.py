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
"""

from __future__ import annotations

import logging
import os

import torch

from . import _cpu, _fast_pick, _grads, _ref
from ._mode import get_mode
from .meta import AttnMeta, write_kv


def _fast() -> bool:
    return get_mode() == "fast"


def _backend(x: torch.Tensor):
    if x.is_cuda:
        try:
            from . import _triton
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "miles_kernels: invariant mode on CUDA needs Triton (pip install triton); "
                "or run in fast mode (miles_kernels.set_mode('fast')), accepting a "
                f"train/rollout mismatch. Import error: {e}") from e
        return _triton
    return _cpu


_FAST_CUDA = []  # [module]: fast mode's row-wise kernels on CUDA, looked up once


def _fast_kernels(x: torch.Tensor):
    """Fast mode's row-wise ops and logprobs: the Triton kernels for CUDA tensors when Triton
    imports (fast mode needs no Triton otherwise), else _ref's torch ops."""
    if not x.is_cuda:
        return _ref
    if not _FAST_CUDA:
        try:
            from . import _triton
        except ImportError:  # pragma: no cover - depends on the install
            _triton = _ref
        _FAST_CUDA.append(_triton)
    return _FAST_CUDA[0]


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


class _Recompute(torch.autograd.Function):
    """Forward from the invariant implementation, backward through the _ref autograd graph."""

    @staticmethod
    def forward(ctx, ref_fn, inv_fn, n_tensors, *args):
        ctx.ref_fn, ctx.n = ref_fn, n_tensors
        ctx.extra = args[n_tensors:]
        ctx.save_for_backward(*args[:n_tensors])
        with torch.no_grad():
            return inv_fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, *_grads_through(ctx.ref_fn, ctx.saved_tensors, ctx.extra, grads),
                *[None] * len(ctx.extra))


def _grads_through(ref_fn, tensors, extra, grads):
    """Input grads of ref_fn(*tensors, *extra) for the output grads, by autograd on detached copies."""
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    with torch.enable_grad():
        out = ref_fn(*inputs, *extra)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   allow_unused=True)) if pairs else iter([None] * len(wanted))
    return [next(got) if t.requires_grad else None for t in inputs]


class _Rule(torch.autograd.Function):
    """Forward from the invariant implementation, backward from a closed-form rule (_grads)."""

    @staticmethod
    def forward(ctx, rule, inv_fn, n_tensors, *args):
        ctx.rule, ctx.n, ctx.extra = rule, n_tensors, args[n_tensors:]
        ctx.save_for_backward(*args[:n_tensors])
        with torch.no_grad():
            return inv_fn(*args)

    @staticmethod
    def backward(ctx, *gs):  # one grad per output; a rule of several outputs gets them as a tuple
        g = gs[0] if len(gs) == 1 else gs
        grads = ctx.rule(ctx.saved_tensors, ctx.extra, g, ctx.needs_input_grad[3: 3 + ctx.n])
        return (None, None, None, *grads, *[None] * len(ctx.extra))


def _with_rule(rule, inv_fn, tensors, extra=()):
    if _needs_grad(*tensors):
        return _Rule.apply(rule, inv_fn, len(tensors), *tensors, *extra)
    with torch.no_grad():
        return inv_fn(*tensors, *extra)


def _invariant(ref_fn, inv_fn, tensors, extra=()):
    if _needs_grad(*tensors):
        return _Recompute.apply(ref_fn, inv_fn, len(tensors), *tensors, *extra)
    with torch.no_grad():
        return inv_fn(*tensors, *extra)


# --- linear -----------------------------------------------------------------------------

class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_NK, b_N, impl):
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias = b_N is not None
        return impl(x_MK, w_NK, b_N)

    @staticmethod
    def backward(ctx, g_MN):
        x_MK, w_NK = ctx.saved_tensors
        gx = g_MN @ w_NK.to(g_MN.dtype) if ctx.needs_input_grad[0] else None
        gw = (g_MN.t() @ x_MK.to(g_MN.dtype)).to(w_NK.dtype) if ctx.needs_input_grad[1] else None
        gb = g_MN.sum(0).to(w_NK.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def linear(x, w_NK, b_N=None):
    """y = x @ w.T (+ b). x [..., K], w [N, K], b [N] -> [..., N] in x's dtype.

    Numerics: operands in their own dtype (bf16 or fp32), fp32 accumulation, one rounding
    to x's dtype; the bias is added after that rounding (as F.linear on bf16 does not).
    """
    if x.dim() != 2:  # 2-D in, 2-D out with no view: FSDP hooks a root module's output
        return linear(x.reshape(-1, x.shape[-1]), w_NK, b_N).reshape(*x.shape[:-1], w_NK.shape[0])
    x = x.contiguous()
    if _fast():
        bs = None if b_N is None else (b_N,)
        kernels = _fast_pick_kernels(x, (w_NK,), bs)
        mine = lambda x, ws, bs: (kernels.linear(x, ws[0], None if bs is None else bs[0]),)  # noqa: E731
        if kernels is None or not _fast_pick.ours("linear", x, (w_NK,), bs, _ref.linears, mine):
            return _ref.linear(x, w_NK, b_N)
        impl = kernels.linear  # faster than cuBLAS at this shape (_fast_pick)
    else:
        impl = _backend(x).linear
    if _needs_grad(x, w_NK, b_N):
        return _Linear.apply(x, w_NK, b_N, impl)
    with torch.no_grad():
        return impl(x, w_NK, b_N)


class _Linears(torch.autograd.Function):
    """Several linears of one x as one autograd node: one launch forward at decode sizes, and
    one Python call each way instead of one per weight (the trainer is host-bound)."""

    @staticmethod
    def forward(ctx, x_MK, impl, n, *wb):
        ws, bs = wb[:n], wb[n:]
        ctx.n, ctx.has_bias = n, bool(bs)
        ctx.save_for_backward(x_MK, *ws)
        return impl(x_MK, ws, bs or None)

    @staticmethod
    def backward(ctx, *gs):
        x_MK, *ws = ctx.saved_tensors
        need, n = ctx.needs_input_grad, ctx.n
        gx = None
        if need[0]:
            for g, w in zip(gs, ws):
                gx = g @ w.to(g.dtype) if gx is None else gx.addmm_(g, w.to(g.dtype))
        gws = [(g.t() @ x_MK.to(g.dtype)).to(w.dtype) if need[3 + i] else None for i, (g, w) in enumerate(zip(gs, ws))]
        gbs = [g.sum(0).to(w.dtype) if ctx.has_bias and need[3 + n + i] else None for i, (g, w) in enumerate(zip(gs, ws))]
        return (gx, None, None, *gws, *gbs)


def _linears_impl(backend):
    if hasattr(backend, "linears"):
        return backend.linears
    return lambda x, ws, bs: tuple(backend.linear(x, w, None if bs is None else bs[i]) for i, w in enumerate(ws))


def _fast_fused_linears(x, ws, bs) -> bool:
    """Fast mode takes the fused kernel where it beats one cuBLAS call a weight: CUDA, no
    autograd, decode-sized M (one launch for q/k/v or gate/up where cuBLAS's small-M GEMMs add
    split-K reduces; 0.6B b64 decode step 2.03 ms with the kernels vs 2.32 with cuBLAS, H200
    2026-12-03): up to the kernel's SMALL_M, where linears is one launch. Triton missing: cuBLAS."""
    if not x.is_cuda or _needs_grad(x, *ws, *(bs or ())):
        return False
    kernels = _fast_kernels(x)
    return hasattr(kernels, "linears") and x.numel() // max(x.shape[-1], 1) <= kernels.matmul.SMALL_M


def _fast_pick_kernels(x, ws, bs):
    """The Triton module whose linear kernels fast mode may pick for these operands (CUDA, Triton
    imported, one dtype the kernels take, 1-3 weights), else None (cuBLAS)."""
    kernels = _fast_kernels(x)
    if kernels is _ref or x.dtype not in kernels.LINEAR_TILES or not 1 <= len(ws) <= 3:
        return None
    return kernels if all(t.dtype == x.dtype for t in (*ws, *(bs or ()))) else None


def _fast_ours_linears(x, ws, bs) -> bool:
    """Fast mode elsewhere: the invariant kernels where they beat one cuBLAS call a weight at
    this shape (_fast_pick times both once)."""
    kernels = _fast_pick_kernels(x, ws, bs)
    return kernels is not None and _fast_pick.ours("linears", x, ws, bs, _ref.linears, _linears_impl(kernels))


def linears(x, ws, bs=None):
    """(linear(x, ws[i], bs[i]) for each i): the same bits, one call (q/k/v; gate/up).

    1-3 weights [N_i, K] of one K; bs None or one bias per weight. On CUDA at decode sizes
    one kernel computes them all (miles_kernels._triton.fused_linears.linears), in fast mode too.
    """
    ws, bs = tuple(ws), None if bs is None else tuple(bs)
    if x.dim() != 2:
        lead = x.shape[:-1]
        ys = linears(x.reshape(-1, x.shape[-1]), ws, bs)
        return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)
    x = x.contiguous()
    grad = _needs_grad(x, *ws, *(bs or ()))
    ref = _fast() and not _fast_fused_linears(x, ws, bs) and not _fast_ours_linears(x, ws, bs)
    if ref and not grad:
        return _ref.linears(x, ws, bs)
    # fast mode with autograd: cuBLAS forward (or the invariant kernel where _fast_pick found it
    # faster), and _Linears' backward (x's grads summed inside addmm, not by one add kernel a weight)
    impl = _ref.linears if ref else _linears_impl(_fast_kernels(x) if _fast() else _backend(x))
    if grad:
        return _Linears.apply(x, impl, len(ws), *ws, *(bs or ()))
    with torch.no_grad():
        return impl(x, ws, bs)


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
    if meta.packed and _fast() and not _triton_bwd_ok(q_THD, k_TKD, v_TKD):
        if _flash_varlen_ok(q_THD, k_TKD, v_TKD):
            try:
                return _FlashPacked.apply(q_THD, k_TKD, v_TKD, meta, scale)
            except (RuntimeError, TypeError) as e:
                _flash_unusable(e)
        return _ref.packed_attention(q_THD, k_TKD, v_TKD, list(meta.host_lists()[1]), scale)
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


# The packed training attention's backward: "triton" (_triton.packed_attention_bwd, from our
# forward's output and LSE; 1.0-1.6x flash's on an H200) or "flash" (torch's flash varlen
# backward). Read once, at import.
ATTN_BWD = os.environ.get("MILES_ATTN_BWD", "triton")
if ATTN_BWD not in ("flash", "triton"):
    raise ValueError(f"MILES_ATTN_BWD={ATTN_BWD!r}: set it to triton (the default) or flash")


def _triton_bwd_ok(q, k, v) -> bool:
    """MILES_ATTN_BWD=triton and tensors its kernels take: CUDA, 16-bit, head dim 2^n <= 256."""
    D = q.shape[-1]
    return (ATTN_BWD == "triton" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and q.shape[0] > 0 and 16 <= D <= 256 and D & (D - 1) == 0)


class _PackedAttention(torch.autograd.Function):
    """Forward: the invariant kernel. Backward: with MILES_ATTN_BWD=triton our Triton kernels
    (_triton_bwd_ok tensors), else flash attention over all the packed sequences
    in one varlen call (GQA native, no per-sequence loop) where torch has it for these
    tensors (CUDA, 16-bit, head_dim % 8 == 0 and <= 256), else autograd through the SDPA
    reference per sequence. Where Triton or flash serves, the forward also writes each row's
    log-sum-exp, so the backward starts from our output and LSE instead of recomputing the
    forward with flash (_flash_varlen_grads). Like SDPA's, the flash backward is
    deterministic only under torch.use_deterministic_algorithms(True); ours always is."""

    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, inv_fn, meta, scale):
        lse_HT = None
        if _backend(q_THD) is not _cpu and (_triton_bwd_ok(q_THD, k_TKD, v_TKD) or (
                _flash_varlen_ok(q_THD, k_TKD, v_TKD) and not _LSE_STATE.get("off"))):
            lse_HT = torch.empty(q_THD.shape[1], q_THD.shape[0], dtype=torch.float32, device=q_THD.device)
        with torch.no_grad():
            out = inv_fn(q_THD, k_TKD, v_TKD, lse_HT)
        ctx.save_for_backward(q_THD, k_TKD, v_TKD, out if lse_HT is not None else None, lse_HT)
        ctx.meta, ctx.scale = meta, scale
        return out

    @staticmethod
    def backward(ctx, g_THD):
        q, k, v, out, lse = ctx.saved_tensors
        grads = None
        if out is not None and _triton_bwd_ok(q, k, v):
            grads = _backend(q).packed_attention_bwd(q, k, v, out, g_THD, lse, ctx.meta.cu_seqlens_q,
                                                     ctx.meta.max_q_len, ctx.scale)
        elif _flash_varlen_ok(q, k, v):
            try:
                grads = _flash_varlen_grads(q, k, v, g_THD, ctx.meta, ctx.scale, out, lse)
            except (RuntimeError, TypeError) as e:
                _flash_unusable(e)
        if grads is None:
            grads = _sdpa_packed_grads(q, k, v, g_THD, ctx.meta, ctx.scale)
        return (*grads, None, None, None)


def _sdpa_packed_grads(q, k, v, g, meta: AttnMeta, scale: float):
    """(dq, dk, dv) by autograd through the SDPA reference, one sequence at a time."""
    lens = list(meta.host_lists()[1])
    return _grads_through(lambda q, k, v: _ref.packed_attention(q, k, v, lens, scale), (q, k, v), (), (g,))


class _FlashPacked(torch.autograd.Function):
    """Fast mode's packed training attention: flash varlen forward and backward, one call each
    for all the sequences, the backward from the forward's saved output (no recompute)."""

    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, meta, scale):
        q, k, v = (t.contiguous() for t in (q_THD, k_TKD, v_TKD))
        out, lse, rng, unused = _flash_varlen_forward(q, k, v, meta, scale)
        ctx.save_for_backward(q, k, v, out, lse, rng, unused)
        ctx.meta, ctx.scale = meta, scale
        return out

    @staticmethod
    def backward(ctx, g_THD):
        q, k, v, out, lse, rng, unused = ctx.saved_tensors
        cu, L = ctx.meta.cu_seqlens_q, ctx.meta.max_q_len
        try:
            grads = torch.ops.aten._flash_attention_backward(g_THD.contiguous(), q, k, v, out, lse, cu, cu, L, L,
                                                             0.0, True, rng, unused, scale=ctx.scale)
        except (RuntimeError, TypeError) as e:
            _flash_unusable(e)
            grads = _sdpa_packed_grads(q, k, v, g_THD, ctx.meta, ctx.scale)
        return (*grads, None, None)


def _flash_varlen_forward(q, k, v, meta: AttnMeta, scale: float):
    """(out, logsumexp, rng_state, unused) of causal flash attention over the packed sequences."""
    cu, L = meta.cu_seqlens_q, meta.max_q_len
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, L, L, 0.0, True, False, scale=scale)[:4]


_FLASH_FAILED: list[str] = []  # why a flash varlen call failed: the SDPA path from then on


def _flash_unusable(e: Exception) -> None:
    """A flash varlen call raised: out of memory is the caller's; anything else (this torch's
    private flash signature moved, or its build lacks flash) is logged once, then SDPA serves."""
    if isinstance(e, torch.OutOfMemoryError):
        raise e
    if not _FLASH_FAILED:
        logging.getLogger(__name__).warning(
            "miles_kernels: flash varlen attention failed (%s: %s); the packed training attention "
            "runs SDPA per sequence from now on (same grads, more host work)", type(e).__name__, e)
    _FLASH_FAILED.append(f"{type(e).__name__}: {e}")


def _flash_varlen_ok(q, k, v) -> bool:
    avail = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    return (not _FLASH_FAILED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
            and q.shape[0] > 0 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and torch.backends.cuda.flash_sdp_enabled() and avail()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


# Whether flash's backward takes our forward's (out, LSE): checked once against flash's own
# forward on the first backward ("ok": the check passed; "off": it failed, flash recomputes).
_LSE_STATE: dict[str, object] = {}


def _flash_varlen_grads(q, k, v, g, meta: AttnMeta, scale: float, out=None, lse=None):
    """(dq, dk, dv) of causal attention of the packed sequences. Flash's backward needs the
    forward's output and log-sum-exp: our forward's (out, lse) when given and checked, else
    flash's forward recomputes them (they differ from ours by rounding only)."""
    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    cu, L = meta.cu_seqlens_q, meta.max_q_len
    if lse is None or "ok" not in _LSE_STATE:
        f_out, f_lse, rng, unused = _flash_varlen_forward(q, k, v, meta, scale)
        if lse is not None and not _LSE_STATE:
            _check_lse(lse, f_lse, rng, unused)
        if lse is None or "ok" not in _LSE_STATE:  # flash's own forward serves the backward
            out, lse = f_out, f_lse
        else:
            rng, unused = _LSE_STATE["ok"]
    else:
        rng, unused = _LSE_STATE["ok"]
    return torch.ops.aten._flash_attention_backward(g, q, k, v, out, lse, cu, cu, L, L, 0.0, True, rng, unused,
                                                    scale=scale)


def _check_lse(ours, flash, rng, unused) -> None:
    """Use our LSE from now on if it has flash's layout and values (within fp32 rounding);
    else say once why not (this torch's flash keeps another layout) and let flash recompute."""
    same = ours.shape == flash.shape and ours.dtype == flash.dtype and bool(
        (ours - flash).abs().max() <= 1e-3 * (1 + flash.abs().max()))
    if same:  # dropout 0: the rng state is a placeholder, the same for every call
        _LSE_STATE["ok"] = (rng, unused)
        return
    _LSE_STATE["off"] = True
    logging.getLogger(__name__).warning(
        "miles_kernels: the attention forward's log-sum-exp (%s %s) does not match flash's (%s %s); the training "
        "backward recomputes the forward with flash (correct, slower)", ours.dtype, list(ours.shape),
        flash.dtype, list(flash.shape))


# --- logprobs ---------------------------------------------------------------------------

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
