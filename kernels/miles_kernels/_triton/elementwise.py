"""Row-local ops: rms_norm, apply_rope, silu_mul. One program per row (or row chunk).

A row's reduction (rms_norm) runs over one fixed block of the whole row, so its order is
the same in any batch; the elementwise math is in fp32 with one rounding at the store.
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch


@fast_launch
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    # HF order: normalise in fp32, round to x dtype, then multiply by w (one more rounding);
    # a product of two 16-bit floats is exact in fp32, so this equals torch's x*w.
    x_normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (x_normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x_MD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """y = (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype) * w; out dtype as torch promotes x, w."""
    D = x_MD.shape[-1]
    if w_D.shape != (D,):
        raise ValueError(f"miles_kernels rms_norm: weight shape {list(w_D.shape)} does not match last dim {D} of x")
    x_2d = x_MD.reshape(-1, D)
    if x_2d.stride(-1) != 1:
        x_2d = x_2d.contiguous()
    y = torch.empty(x_2d.shape, dtype=torch.result_type(x_MD, w_D), device=x_MD.device)
    if x_2d.shape[0] > 0:
        block_d = triton.next_power_of_2(D)
        _rms_norm_kernel[(x_2d.shape[0],)](
            x_2d, w_D.contiguous(), y, D, x_2d.stride(0), y.stride(0), eps,
            BLOCK_D=block_d, num_warps=max(1, min(16, block_d // 256)),
        )
    return y.view(x_MD.shape)


@fast_launch
@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, H, F,
    stride_xt, stride_xh, stride_ct, stride_st, stride_yt, stride_yh,
    BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, INVERSE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    fs = tl.arange(0, BLOCK_F)
    mask = (hs[:, None] < H) & (fs[None, :] < F)
    c = tl.load(cos_ptr + t * stride_ct + fs, mask=fs < F, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * stride_st + fs, mask=fs < F, other=0.0)[None, :]
    if INVERSE:  # the transpose rotation (RoPE's backward): rotate by -angle
        s = -s
    x_ptrs = x_ptr + t * stride_xt + hs[:, None] * stride_xh + fs[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + t * stride_yt + hs[:, None] * stride_yh + fs[None, :]
    tl.store(y_ptrs, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + F, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def apply_rope(x_THD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Neox rotate-half RoPE: out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin (fp32 math, F = D/2)."""
    T, H, D = x_THD.shape
    F = D // 2
    if D % 2 or cos_TF.shape != (T, F) or sin_TF.shape != (T, F):
        raise ValueError(
            f"miles_kernels apply_rope: x is [T={T}, H={H}, D={D}] so cos/sin must be fp32 [T, D/2]=[{T}, {F}], "
            f"got {list(cos_TF.shape)} and {list(sin_TF.shape)}"
        )
    if cos_TF.dtype != torch.float32 or sin_TF.dtype != torch.float32:
        raise TypeError("miles_kernels apply_rope: cos/sin tables must be fp32 (build them with mk.rope_cos_sin)")
    return rotate(x_THD, cos_TF, sin_TF, x_THD.dtype, inverse=False)


def rotate(x_THD, cos_TF, sin_TF, dtype: torch.dtype, inverse: bool) -> torch.Tensor:
    """The rotation of apply_rope (inverse: by -angle) on checked shapes, one rounding to dtype."""
    T, H, D = x_THD.shape
    if x_THD.stride(-1) != 1:
        x_THD = x_THD.contiguous()
    cos_TF, sin_TF = cos_TF.contiguous(), sin_TF.contiguous()
    y = torch.empty((T, H, D), dtype=dtype, device=x_THD.device)
    if T > 0:
        _rope_kernel[(T,)](
            x_THD, cos_TF, sin_TF, y, H, D // 2,
            x_THD.stride(0), x_THD.stride(1), cos_TF.stride(0), sin_TF.stride(0), y.stride(0), y.stride(1),
            BLOCK_H=triton.next_power_of_2(H), BLOCK_F=triton.next_power_of_2(D // 2), INVERSE=inverse, num_warps=4,
        )
    return y


_SILU_BLOCK = 1024


@fast_launch
@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, F, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_MF: torch.Tensor, up_MF: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up in fp32, one rounding to gate's dtype. Accepts column slices of a fused gate_up."""
    if gate_MF.shape != up_MF.shape:
        raise ValueError(f"miles_kernels silu_mul: gate {list(gate_MF.shape)} and up {list(up_MF.shape)} differ")
    F = gate_MF.shape[-1]
    g, u = gate_MF.reshape(-1, F), up_MF.reshape(-1, F)
    g = g if g.stride(-1) == 1 else g.contiguous()
    u = u if u.stride(-1) == 1 else u.contiguous()
    y = torch.empty(g.shape, dtype=gate_MF.dtype, device=gate_MF.device)
    if g.shape[0] > 0 and F > 0:
        grid = (g.shape[0], triton.cdiv(F, _SILU_BLOCK))
        _silu_mul_kernel[grid](g, u, y, F, g.stride(0), u.stride(0), y.stride(0), BLOCK=_SILU_BLOCK, num_warps=4)
    return y.view(gate_MF.shape)
