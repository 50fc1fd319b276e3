"""Closed-form backward rules of the row-wise ops (rms_norm, apply_rope, silu_mul, qk_norm_rope, moe_combine).

The forward comes from the invariant kernel; the backward is the derivative of the _ref
formula, written out in fp32: no forward recompute and no autograd graph built inside the
backward (fewer kernels and less host work per layer than recomputing through _ref). The
backward need not be batch-invariant; tests compare these with autograd through _ref.
Each rule: (saved tensors, extra args, output grad, needs_input_grad) -> input grads.
On CUDA a rule runs the Triton kernels of _triton/elementwise_grads.py (one launch each,
plus one sum for rms_norm's weight grad: far less host time than a dozen torch ops); on
other devices it runs the torch code of its *_torch twin, the reference for those kernels.
"""

from __future__ import annotations

import os

import torch

# The MoE backward (moe_combine's and moe_dispatch's) on CUDA: "torch" (the torch rules below)
# or "triton" (_triton/moe.py: one kernel each, no [T, k, D] fp32 temporaries). Read once, at
# import. Default triton: GPU-checked (tests/gpu), MoE step 0.142 -> 0.125 s (docs/benchmarks.md).
MOE_BWD = os.environ.get("MILES_MOE_BWD", "triton")
if MOE_BWD not in ("torch", "triton"):
    raise ValueError(f"MILES_MOE_BWD={MOE_BWD!r}: set it to triton (the default) or torch")


def rms_norm(saved, extra, g, needs, add=None):
    """The Triton kernel on CUDA, else rms_norm_torch. add (x's dtype and shape, or None): x's
    grad plus add, as torch's `gx + add` gives it (a residual's other grad), one pass on CUDA."""
    x, w = saved
    fused = add is not None and add.dtype == x.dtype and add.shape == x.shape
    if x.is_cuda:
        from . import _triton

        gx, gw = _triton.rms_norm_grad(x, w, g, extra[0], needs[0], needs[1], add if fused else None)
        if fused:
            return gx, gw
    else:
        gx, gw = rms_norm_torch(saved, extra, g, needs)
    return (gx + add if gx is not None and add is not None else gx), gw


def rms_norm_torch(saved, extra, g, needs):
    """y = (x * r).to(dt) * w, r = rsqrt(mean(x^2) + eps), x in fp32."""
    x, w = saved
    (eps,) = extra
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    gx = gw = None
    if needs[1]:
        gw = (g.float() * xhat.to(x.dtype).float()).sum(0).to(w.dtype)
    if needs[0]:
        ga = g.float() * w.float()
        gx = (r * (ga - xhat * (ga * xhat).mean(-1, keepdim=True))).to(x.dtype)
    return gx, gw


def apply_rope(saved, extra, g, needs):
    """The Triton kernel on CUDA, else apply_rope_torch."""
    x, cos_TF, sin_TF = saved
    if x.is_cuda and needs[0]:
        from . import _triton

        return _triton.apply_rope_grad(g, cos_TF, sin_TF, x.dtype), None, None
    return apply_rope_torch(saved, extra, g, needs)


def apply_rope_torch(saved, extra, g, needs):
    """y = [x1 c - x2 s, x2 c + x1 s]: the transpose rotation [g1 c + g2 s, g2 c - g1 s]."""
    x, cos_TF, sin_TF = saved
    if not needs[0]:
        return None, None, None
    return _rotate_back(g, cos_TF, sin_TF, x.dtype), None, None


def _rotate_back(g, cos_TF, sin_TF, dtype):
    F_ = g.shape[-1] // 2
    gf = g.float()
    g1, g2 = gf[..., :F_], gf[..., F_:]
    c, s = cos_TF[:, None, :].float(), sin_TF[:, None, :].float()
    return torch.cat([g1 * c + g2 * s, g2 * c - g1 * s], dim=-1).to(dtype)


def rope_grad(g, cos_TF, sin_TF, dtype):
    """apply_rope's x grad for the output grad g, in dtype (x's): what its rule computes."""
    if g.is_cuda:
        from . import _triton

        return _triton.apply_rope_grad(g, cos_TF, sin_TF, dtype)
    return _rotate_back(g, cos_TF, sin_TF, dtype)


def qk_norm_rope(saved, extra, gs, needs):
    """q's and k's: apply_rope's rule, then rms_norm's on [rows, D] (as ops.rms_norm saw them),
    each as the unfused ops' backward computes it. gs: the grads of (q_out, k_out)."""
    q, k, q_w, k_w, cos_TF, sin_TF = saved
    (eps,) = extra
    gq, gq_w = _norm_rope_grad(q, q_w, cos_TF, sin_TF, eps, gs[0], needs[0], needs[2])
    gk, gk_w = _norm_rope_grad(k, k_w, cos_TF, sin_TF, eps, gs[1], needs[1], needs[3])
    return gq, gk, gq_w, gk_w, None, None


def _norm_rope_grad(x, w, cos_TF, sin_TF, eps, g, need_x, need_w):
    if g is None or not (need_x or need_w):
        return None, None
    D = x.shape[-1]
    g_normed = rope_grad(g, cos_TF, sin_TF, torch.result_type(x, w))
    gx, gw = rms_norm((x.reshape(-1, D), w), (eps,), g_normed.reshape(-1, D), (need_x, need_w))
    return (None if gx is None else gx.reshape(x.shape)), gw


def silu_mul(saved, extra, g, needs):
    """The Triton kernel on CUDA, else silu_mul_torch."""
    a, u = saved
    if a.is_cuda:
        from . import _triton

        return _triton.silu_mul_grad(a, u, g, needs[0], needs[1])
    return silu_mul_torch(saved, extra, g, needs)


def silu_mul_torch(saved, extra, g, needs):
    """y = silu(a) * u: dy/da = u * sig(a) * (1 + a * (1 - sig(a))), dy/du = silu(a)."""
    a, u = saved
    af, uf, gf = a.float(), u.float(), g.float()
    sig = torch.sigmoid(af)
    ga = (gf * uf * sig * (1 + af * (1 - sig))).to(a.dtype) if needs[0] else None
    gu = (gf * af * sig).to(u.dtype) if needs[1] else None
    return ga, gu


def moe_combine(saved, extra, g, needs):
    """The Triton kernel on CUDA unless MILES_MOE_BWD=torch (both grads in one pass), else moe_combine_torch."""
    y, pos, w = saved
    if y.is_cuda and MOE_BWD == "triton":
        from . import _triton

        gy, gw = _triton.moe_combine_grad(y, pos, w, g)
        return gy if needs[0] else None, None, gw if needs[2] else None
    return moe_combine_torch(saved, extra, g, needs)


def moe_combine_torch(saved, extra, g, needs):
    """out[t] = sum_j w[t, j] * y[pos[t, j]] (fp32): dy[pos[t, j]] = g[t] * w[t, j], dw[t, j] = g[t] . y[pos[t, j]].
    Each row of y gets its one slot's gradient (rows no slot reads: 0)."""
    y, pos, w = saved
    T, k = pos.shape
    gf = g.float()
    gy = gw = None
    if needs[0]:
        gy = torch.zeros_like(y)
        gy.index_copy_(0, pos.reshape(-1), (gf[:, None, :] * w.float()[:, :, None]).to(y.dtype).view(T * k, -1))
    if needs[2]:
        gw = (y[pos.reshape(-1)].view(T, k, -1).float() * gf[:, None, :]).sum(-1).to(w.dtype)
    return gy, None, gw
