"""Row-local ops: rms_norm, apply_rope, silu_mul, and two fusions of them, add_rms_norm and
qk_norm_rope (which can also store K and V in the paged cache: qk_norm_rope_write_kv). One
program per row (or row chunk, or head).

A row's reduction (rms_norm) runs over one fixed block of the whole row, so its order is
the same in any batch; the elementwise math is in fp32 with one rounding at the store.

The fused kernels give the unfused ops' bits: they are built from the same @triton.jit
helpers (`_inv_rms`, `_normed`, `_rotate`), inlined into the same expressions, and launch
with the same num_warps over the same row block. The statistics of a row come from a load
of the whole row as rms_norm's kernel makes it, so the reduction gets rms_norm's layout,
hence its order; the rest is elementwise, where only the expression matters (fma
contraction included: `_rotate` writes its fmas out, so no compiler choice enters).
"""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.gdc import gdc_release, gdc_wait
from miles_kernels._triton import launch
from miles_kernels._triton.launch import fast_launch


@triton.jit
def _inv_rms(x, D, eps):
    """rsqrt(mean(x^2) + eps) of one fp32 row held whole (masked lanes 0): rms_norm's one reduction."""
    return tl.rsqrt(tl.sum(x * x, 0) / D + eps)


@triton.jit
def _normed(x, inv_rms, w, x_ptr, y_ptr):
    """rms_norm's output for fp32 x (any part of a row) and w: normalise in fp32, round to x's
    dtype (x_ptr's), then multiply by w and round to y's (y_ptr's). That is HF's order; a product
    of two 16-bit floats is exact in fp32, so the multiply equals torch's x*w."""
    return ((x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * w).to(y_ptr.dtype.element_ty)


@triton.jit
def _rms_norm_row(x, w_ptr, y_ptr, cols, mask, D, eps, x_ptr):
    """Store rms_norm of the fp32 row x (loaded whole, x_ptr's dtype) at y_ptr + cols."""
    inv_rms = _inv_rms(x, D, eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, _normed(x, inv_rms, w, x_ptr, y_ptr), mask=mask)


def _row_warps(block_d: int) -> int:
    """Warps of a program holding a whole row of block_d: rms_norm's, and so its fusions' (the
    warps shape the reduction's layout, hence its order)."""
    return max(1, min(16, block_d // 256))


@fast_launch
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK_D: tl.constexpr,
                     USE_GDC: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gdc_wait(USE_GDC)  # PDL (gdc.py): the kernel before done; the next released once the row is loaded
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_release(USE_GDC)
    _rms_norm_row(x, w_ptr, y_ptr + row * stride_y, cols, mask, D, eps, x_ptr)


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
            BLOCK_D=block_d, USE_GDC=launch.gdc_rows(x_2d, x_2d.shape[0], launch.PDL_NORM_MAX_ROWS),
            num_warps=_row_warps(block_d),
        )
    return y.view(x_MD.shape)


@fast_launch
@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, D, stride_x, stride_r, stride_h, stride_y, eps, BLOCK_D: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gdc_wait(USE_GDC)  # PDL (gdc.py), as in _rms_norm_kernel
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_release(USE_GDC)
    h = (x + r).to(h_ptr.dtype.element_ty)  # torch's x + r: the fp32 sum, one rounding
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    _rms_norm_row(h.to(tl.float32), w_ptr, y_ptr + row * stride_y, cols, mask, D, eps, h_ptr)


def _aligned_rows(x_MD: torch.Tensor) -> torch.Tensor:
    """x as rms_norm's kernel reads a fresh tensor: contiguous and 16-byte aligned (Triton keys its
    load layout, and so the reduction's order, on both), else a copy."""
    return x_MD if x_MD.is_contiguous() and x_MD.data_ptr() % 16 == 0 else x_MD.clone(
        memory_format=torch.contiguous_format)


def add_rms_norm(x_MD: torch.Tensor, r_MD: torch.Tensor, w_D: torch.Tensor, eps: float):
    """(h, y) = (x + r, rms_norm(h, w, eps)) in one launch, the bits of torch's add then rms_norm.

    x, r: [M, D] of one dtype (checked by miles_kernels.add_rms_norm); h in that dtype, y as
    rms_norm gives it (torch's promotion of h and w).
    """
    M, D = x_MD.shape
    x_MD, r_MD = _aligned_rows(x_MD), _aligned_rows(r_MD)
    h = torch.empty((M, D), dtype=x_MD.dtype, device=x_MD.device)
    y = torch.empty((M, D), dtype=torch.result_type(x_MD, w_D), device=x_MD.device)
    if M > 0:
        block_d = triton.next_power_of_2(D)
        _add_rms_norm_kernel[(M,)](
            x_MD, r_MD, w_D.contiguous(), h, y, D, x_MD.stride(0), r_MD.stride(0), h.stride(0), y.stride(0), eps,
            BLOCK_D=block_d, USE_GDC=launch.gdc_rows(x_MD, M, launch.PDL_NORM_MAX_ROWS),
            num_warps=_row_warps(block_d),
        )
    return h, y


@triton.jit
def _rotate(x1, x2, c, s):
    """Neox RoPE of the halves (x1, x2) of fp32 rows: (x1 c - x2 s, x2 c + x1 s), fp32, with the
    fma contraction written out (x1's products fused): left to the compiler, which product it
    fuses changed with the code around it, and so the bits (the norm/RoPE kernel's k vs the
    RoPE kernel's, by one ulp, once its rows were loaded ahead)."""
    return tl.fma(x1, c, -(x2 * s)), tl.fma(x1, s, x2 * c)


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
    y1, y2 = _rotate(x1, x2, c, s)
    y_ptrs = y_ptr + t * stride_yt + hs[:, None] * stride_yh + fs[None, :]
    tl.store(y_ptrs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + F, y2.to(y_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _norm_rope_load(x_ptr, cos_ptr, sin_ptr, D, F, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """What one head row needs from memory: the whole row (for its statistics, loaded as rms_norm's
    kernel loads it), its halves, and the token's cos/sin halves (cos_ptr, sin_ptr: the token's)."""
    cols = tl.arange(0, BLOCK_D)
    fs = tl.arange(0, BLOCK_F)
    fm = fs < F
    x = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + fs, mask=fm, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + F + fs, mask=fm, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + fs, mask=fm, other=0.0)
    s = tl.load(sin_ptr + fs, mask=fm, other=0.0)
    return x, x1, x2, c, s


@triton.jit
def _norm_rope_weights(w_ptr, F, BLOCK_F: tl.constexpr):
    """The norm weight's halves in fp32 (one load for all of a program's rows)."""
    fs = tl.arange(0, BLOCK_F)
    fm = fs < F
    return tl.load(w_ptr + fs, mask=fm, other=0.0).to(tl.float32), tl.load(w_ptr + F + fs, mask=fm, other=0.0).to(tl.float32)


@triton.jit
def _norm_rope_store(row, w, x_ptr, y_ptr, D, F, eps, BLOCK_F: tl.constexpr):
    """Store apply_rope(rms_norm(x)) of a head row loaded by _norm_rope_load (`row`; x_ptr gives x's
    dtype; w: _norm_rope_weights) at y_ptr: the statistics of the whole row, then each half
    normalised (`_normed`, rounded to y's dtype as rms_norm stores it) and rotated."""
    x, x1, x2, c, s = row
    w1, w2 = w
    inv_rms = _inv_rms(x, D, eps)
    fs = tl.arange(0, BLOCK_F)
    fm = fs < F
    y1, y2 = _rotate(_normed(x1, inv_rms, w1, x_ptr, y_ptr).to(tl.float32),
                     _normed(x2, inv_rms, w2, x_ptr, y_ptr).to(tl.float32), c, s)
    tl.store(y_ptr + fs, y1.to(y_ptr.dtype.element_ty), mask=fm)
    tl.store(y_ptr + F + fs, y2.to(y_ptr.dtype.element_ty), mask=fm)


@fast_launch
@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, slot_ptr, T, H, K, D, F,
    stride_q, stride_k, stride_vt, stride_vh, stride_qo, stride_ko, stride_ct, stride_st, eps,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, TO_CACHE: tl.constexpr, TOKENS: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    """Program (i, j): head j of tokens i * TOKENS ... (i + 1) * TOKENS - 1, a q head for j < H,
    else k head j - H. q, k, and the outputs are [T * heads, D] rows (stride_*: the row stride).
    TO_CACHE: k's rows go to the contiguous cache ko [slots, K, D] at slot t's slot, and programs
    j >= H + K copy v's head j - H - K there too (write_kv's copy, its cast to the cache's dtype).
    A program loads all its rows before it stores any (a row's loads after an earlier row's
    stores would wait for them: the compiler cannot rule out aliasing), then computes each with
    the one-row code: a row's bits whatever TOKENS is (past T: the last token again, the same
    bits stored twice). USE_GDC (PDL, gdc.py): the kernel before waited for first; the next released
    once a program's rows are loaded."""
    gdc_wait(USE_GDC)
    j = tl.program_id(1)
    ts = ()
    for i in tl.static_range(TOKENS):
        ts = ts + (tl.minimum(tl.program_id(0) * TOKENS + i, T - 1).to(tl.int64),)
    if j < H:
        w = _norm_rope_weights(qw_ptr, F, BLOCK_F)
        rows = ()
        for i in tl.static_range(TOKENS):
            rows = rows + (_norm_rope_load(q_ptr + (ts[i] * H + j) * stride_q, cos_ptr + ts[i] * stride_ct,
                                           sin_ptr + ts[i] * stride_st, D, F, BLOCK_D, BLOCK_F),)
        gdc_release(USE_GDC)
        for i in tl.static_range(TOKENS):
            _norm_rope_store(rows[i], w, q_ptr, qo_ptr + (ts[i] * H + j) * stride_qo, D, F, eps, BLOCK_F)
    elif j < H + K:
        w = _norm_rope_weights(kw_ptr, F, BLOCK_F)
        rows = ()
        dsts = ()
        for i in tl.static_range(TOKENS):
            rows = rows + (_norm_rope_load(k_ptr + (ts[i] * K + (j - H)) * stride_k, cos_ptr + ts[i] * stride_ct,
                                           sin_ptr + ts[i] * stride_st, D, F, BLOCK_D, BLOCK_F),)
            if TO_CACHE:
                dsts = dsts + (ko_ptr + (tl.load(slot_ptr + ts[i]).to(tl.int64) * K + (j - H)) * D,)
            else:
                dsts = dsts + (ko_ptr + (ts[i] * K + (j - H)) * stride_ko,)
        gdc_release(USE_GDC)
        for i in tl.static_range(TOKENS):
            _norm_rope_store(rows[i], w, k_ptr, dsts[i], D, F, eps, BLOCK_F)
    else:
        h = j - H - K
        cols = tl.arange(0, BLOCK_D)
        vs = ()
        dsts = ()
        for i in tl.static_range(TOKENS):
            vs = vs + (tl.load(v_ptr + ts[i] * stride_vt + h * stride_vh + cols, mask=cols < D),)
            dsts = dsts + (vo_ptr + (tl.load(slot_ptr + ts[i]).to(tl.int64) * K + h) * D,)
        gdc_release(USE_GDC)
        for i in tl.static_range(TOKENS):
            tl.store(dsts[i] + cols, vs[i].to(vo_ptr.dtype.element_ty), mask=cols < D)


# Tokens a program of _qk_norm_rope_kernel takes from this many tokens on: one (token, head)
# row a program leaves each SM latency-bound (16k-token training forward: 238 us a layer on an
# H200, ~5x the bytes' time); decode and short chunks keep one row a program (more programs).
_ROWS_TOKENS = 2048
_TOKENS_PER_PROGRAM = 4


def qk_norm_rope(q_THD: torch.Tensor, k_TKD: torch.Tensor, q_w_D: torch.Tensor, k_w_D: torch.Tensor,
                 cos_TF: torch.Tensor, sin_TF: torch.Tensor, eps: float):
    """(apply_rope(rms_norm(q, q_w, eps), cos, sin), the same of k with k_w) in one launch, one
    program per (token, head), bit for bit the two ops' results. Shapes as checked by
    miles_kernels.qk_norm_rope; outputs in rms_norm's dtype (torch's promotion of x and w)."""
    T, H, D = q_THD.shape
    k_out = torch.empty((T, k_TKD.shape[1], D), dtype=torch.result_type(k_TKD, k_w_D), device=k_TKD.device)
    return _launch_qk_norm_rope(q_THD, k_TKD, None, q_w_D, k_w_D, cos_TF, sin_TF, eps, k_out, None, None), k_out


def qk_norm_rope_write_kv(q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, q_w_D: torch.Tensor,
                          k_w_D: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor, eps: float,
                          k_cache_PSKD: torch.Tensor, v_cache_PSKD: torch.Tensor, slot_T: torch.Tensor) -> torch.Tensor:
    """qk_norm_rope's q, with its k and v stored at slot_T in the caches as write_kv stores them,
    all in one launch (one program per (token, head) of q, k and v). The caller checks what
    miles_kernels.ops does: contiguous [P, S, K, D] caches, k's cache in rms_norm's dtype (one
    rounding, as qk_norm_rope then write_kv round it), v with a unit last stride, slots int."""
    return _launch_qk_norm_rope(q_THD, k_TKD, v_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps, k_cache_PSKD, v_cache_PSKD,
                                slot_T.contiguous())


def _launch_qk_norm_rope(q_THD, k_TKD, v_TKD, q_w_D, k_w_D, cos_TF, sin_TF, eps, k_out, v_out, slot_T):
    T, H, D = q_THD.shape
    K = k_TKD.shape[1]
    # the head rows as rms_norm reads them: q.reshape(-1, D), unit stride (a copy where the view cannot be)
    q_MD, k_MD = (x.reshape(-1, D) for x in (q_THD, k_TKD))
    q_MD, k_MD = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_MD, k_MD))
    q_out = torch.empty((T, H, D), dtype=torch.result_type(q_THD, q_w_D), device=q_THD.device)
    cos_TF, sin_TF = cos_TF.contiguous(), sin_TF.contiguous()
    to_cache = v_TKD is not None
    v = v_TKD if to_cache else q_out  # unused pointers where not to_cache
    if T > 0:
        block_d = triton.next_power_of_2(D)
        tokens = _TOKENS_PER_PROGRAM if T >= _ROWS_TOKENS else 1
        _qk_norm_rope_kernel[(triton.cdiv(T, tokens), H + 2 * K if to_cache else H + K)](
            q_MD, k_MD, v, q_w_D.contiguous(), k_w_D.contiguous(), cos_TF, sin_TF, q_out, k_out,
            v_out if to_cache else q_out, slot_T if to_cache else cos_TF, T, H, K, D, D // 2,
            q_MD.stride(0), k_MD.stride(0), v.stride(0), v.stride(1), D, D, cos_TF.stride(0), sin_TF.stride(0), eps,
            BLOCK_D=block_d, BLOCK_F=triton.next_power_of_2(D // 2), TO_CACHE=to_cache, TOKENS=tokens,
            USE_GDC=launch.gdc_rows(q_MD, T), num_warps=_row_warps(block_d),
        )
    return q_out


_SILU_BLOCK = 1024


@triton.jit
def silu_times(g, u):
    """silu(g) * u of fp32 values: silu_mul's one expression (matmul's swiglu epilogue uses it too)."""
    return g / (1.0 + tl.exp(-g)) * u


@fast_launch
@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, F, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_times(g, u)
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
