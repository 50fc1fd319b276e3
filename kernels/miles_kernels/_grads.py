"""Closed-form backward rules of the row-wise ops (rms_norm, apply_rope, silu_mul).

The forward comes from the invariant kernel; the backward is the derivative of the _ref
formula, written out in fp32: no forward recompute and no autograd graph built inside the
backward (fewer kernels and less host work per layer than recomputing through _ref). The
backward need not be batch-invariant; tests compare these with autograd through _ref.
Each rule: (saved tensors, extra args, output grad, needs_input_grad) -> input grads.
"""

from __future__ import annotations

import torch


def rms_norm(saved, extra, g, needs):
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
    """y = [x1 c - x2 s, x2 c + x1 s]: the transpose rotation [g1 c + g2 s, g2 c - g1 s]."""
    x, cos_TF, sin_TF = saved
    if not needs[0]:
        return None, None, None
    F_ = g.shape[-1] // 2
    gf = g.float()
    g1, g2 = gf[..., :F_], gf[..., F_:]
    c, s = cos_TF[:, None, :].float(), sin_TF[:, None, :].float()
    return torch.cat([g1 * c + g2 * s, g2 * c - g1 * s], dim=-1).to(x.dtype), None, None


def silu_mul(saved, extra, g, needs):
    """y = silu(a) * u: dy/da = u * sig(a) * (1 + a * (1 - sig(a))), dy/du = silu(a)."""
    a, u = saved
    af, uf, gf = a.float(), u.float(), g.float()
    sig = torch.sigmoid(af)
    ga = (gf * uf * sig * (1 + af * (1 - sig))).to(a.dtype) if needs[0] else None
    gu = (gf * af * sig).to(u.dtype) if needs[1] else None
    return ga, gu
