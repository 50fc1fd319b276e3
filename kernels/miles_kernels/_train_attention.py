"""The packed training attention's autograd: the invariant forward with our Triton backward, flash's
varlen backward or SDPA's per sequence (_PackedAttention), and fast mode's flash forward and backward
(_FlashPacked, through fast_packed_attention where our backward does not serve)."""

from __future__ import annotations

import logging
import os

import torch

from . import _cpu, _ref
from ._dispatch import _backend, _grads_through
from .meta import AttnMeta


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


def fast_packed_attention(q_THD, k_TKD, v_TKD, meta: AttnMeta, scale: float):
    """Fast mode's packed training attention where our Triton backward does not serve (None where it
    does): flash varlen forward and backward, else autograd through SDPA per sequence."""
    if _triton_bwd_ok(q_THD, k_TKD, v_TKD):
        return None
    if _flash_varlen_ok(q_THD, k_TKD, v_TKD):
        try:
            return _FlashPacked.apply(q_THD, k_TKD, v_TKD, meta, scale)
        except (RuntimeError, TypeError) as e:
            _flash_unusable(e)
    return _ref.packed_attention(q_THD, k_TKD, v_TKD, list(meta.host_lists()[1]), scale)


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
