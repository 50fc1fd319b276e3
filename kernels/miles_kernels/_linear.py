"""linear and linears (several weights of one input): invariant kernels, or in fast mode cuBLAS unless the
invariant kernel timed faster at the shape (_fast_pick)."""

from __future__ import annotations

import torch

from . import _fast_pick, _ref
from ._dispatch import _backend, _fast, _fast_kernels, _needs_grad


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
