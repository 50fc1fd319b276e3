"""Backward of logprobs (log-softmax at ids, and entropy) over the vocabulary: one pass.

The math is that of the torch rule _logprobs._logprobs_grad (fp32 inside, one rounding to the
output's dtype), elementwise given each row's lse (and entropy) from the forward: no
reduction, so a program per (row, vocab tile). The logits are read once in their own
dtype and the grad written once; no fp32 [T, V] temporary. Deterministic, like every
elementwise kernel.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch

GRAD_BLOCK = 4096  # vocab entries per program


@fast_launch
@triton.jit
def _logprobs_grad_kernel(
    logits_ptr, ids_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, out_ptr, V, stride_x, stride_o,
    temperature_in, temperature_out,
    BLOCK: tl.constexpr, HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, SCALED_IN: tl.constexpr,
    SCALED_OUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    z = tl.load(logits_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if SCALED_IN:  # else T = 1: dividing by 1 changes no bit
        z = z / temperature_in
    lse = tl.load(lse_ptr + row)
    p = tl.exp(z - lse)  # 0 where z = -inf (masked by top-k / top-p)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_LOGP:
        gl = tl.load(g_logp_ptr + row)
        tok = tl.load(ids_ptr + row)
        g = -p * gl
        # a masked id (logp = -inf) gets no one-hot term
        g = tl.where((cols == tok) & (z > float("-inf")), g + gl, g)
    if HAS_ENT:
        # dH/dz_j = -p_j (log p_j + H); masked tokens (p = 0) get 0
        logp_all = tl.where(p > 0.0, z - lse, 0.0)
        ge = tl.load(g_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
        g = g - ge * p * (logp_all + ent)
    if SCALED_OUT:
        g = g / temperature_out
    tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


def _row_vector(t: torch.Tensor) -> torch.Tensor:
    """A per-row fp32 vector with unit stride (autograd's grads may be expanded: stride 0)."""
    return t.to(torch.float32).contiguous()


def logprobs_grad(logits_TV: torch.Tensor, ids_T: torch.Tensor, lse_T: torch.Tensor, ent_T: torch.Tensor,
                  g_logp_T, g_ent_T, temperature_in: float, temperature_out: float,
                  out_TV: torch.Tensor) -> torch.Tensor:
    """Write d(loss)/d(logits) into out_TV ([T, V], or a row slice of a larger tensor) and return it.

    z = logits.float() / temperature_in (masked tokens are -inf), p = exp(z - lse);
    g = g_logp * (onehot(ids) - p) - g_ent * p * (log p + ent), divided by temperature_out
    and rounded once to out's dtype; a masked id gets no one-hot term. g_logp_T / g_ent_T
    may be None (no such term).
    For top-k / top-p, pass the filtered fp32 z as logits with temperature_in = 1.
    """
    T, V = logits_TV.shape
    if out_TV.shape != (T, V):
        raise ValueError(f"miles_kernels logprobs_grad: out shape {list(out_TV.shape)} must be [T, V]=[{T}, {V}]")
    if T == 0 or V == 0:
        return out_TV
    if out_TV.stride(-1) != 1:  # the kernel stores unit-stride rows: go through a contiguous copy
        tmp_TV = torch.empty((T, V), dtype=out_TV.dtype, device=out_TV.device)
        args = (logits_TV, ids_T, lse_T, ent_T, g_logp_T, g_ent_T, temperature_in, temperature_out)
        return out_TV.copy_(logprobs_grad(*args, tmp_TV))
    if logits_TV.stride(-1) != 1:
        logits_TV = logits_TV.contiguous()
    lse_T = _row_vector(lse_T)
    has_logp, has_ent = g_logp_T is not None, g_ent_T is not None
    g_logp_T = _row_vector(g_logp_T) if has_logp else lse_T  # unused pointers: never loaded
    g_ent_T = _row_vector(g_ent_T) if has_ent else lse_T
    ent_T = _row_vector(ent_T) if has_ent else lse_T
    grid = (T, triton.cdiv(V, GRAD_BLOCK))  # rows on axis 0: axis 1 allows only 65535 programs
    _logprobs_grad_kernel[grid](
        logits_TV, ids_T.contiguous(), lse_T, ent_T, g_logp_T, g_ent_T, out_TV, V,
        logits_TV.stride(0), out_TV.stride(0), float(temperature_in), float(temperature_out),
        BLOCK=GRAD_BLOCK, HAS_LOGP=has_logp, HAS_ENT=has_ent, SCALED_IN=temperature_in != 1.0,
        SCALED_OUT=temperature_out != 1.0, num_warps=8,
    )
    return out_TV

