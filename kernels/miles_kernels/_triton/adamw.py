"""AdamW over a list of tensors in one launch: torch's fused AdamW step, with the grads read in
any float dtype and the new parameters' bf16 (or fp16) copies written in the same pass.

The trainer's one-rank step (train/optim.py) calls it with the backward's bf16 grads: no fp32
copy of them, no write-back of the unscaled grads, no separate cast of the masters for the
next forward (~30 bytes a parameter moved, against ~48 for those four passes).

The math is torch's fused AdamW (aten/src/ATen/native/cuda/fused_adam_utils.cuh, torch 2.11):
the hyperparameters as floats, the grad divided by grad_scale, the decay and the moments'
lerps as fmas, the bias corrections from each tensor's own step count (1 - pow(beta, step) and
its sqrt in float, made here by torch's pow on the device), found_inf skipping the step. On an
H200 the result equals torch's bit for bit (params, moments; tests/gpu/test_trainer_gpu.py).

Programs take CHUNK elements of one tensor each, BLOCK at a time: (tensor, first element)
pairs in a table fixed by the shapes, the tensors' addresses in a second table made each call
(grads are new tensors after every backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements a loop step: 4 a thread at 8 warps (16-byte fp32 accesses, ~60 registers)
CHUNK = 16384  # elements a program
NUM_WARPS = 8
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _pointer(tab_ptr, col, n_tensors, i, dtype: tl.constexpr):
    return tl.multiple_of(tl.load(tab_ptr + col * n_tensors + i).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, ok, lr, beta1, beta2, lr_wd, eps, step_size, bc2_sqrt,
                 scale_ptr, HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, WRITE_SHADOW: tl.constexpr):
    """torch's AdamW math on the elements at offs (ok: the mask, or None for a whole block)."""
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr))
    p = tl.load(p_ptr + offs, mask=ok)
    m = tl.load(m_ptr + offs, mask=ok)
    v = tl.load(v_ptr + offs, mask=ok)
    if HAS_WD:
        p = tl.fma(-lr_wd, p, p)  # param -= lr * weight_decay * param, contracted as nvcc does
    m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
    gg = g * g
    v = tl.fma(beta2, v, tl.fma(-beta2, gg, gg))
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if WRITE_SHADOW:
        tl.store(s_ptr + offs, p.to(s_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)


@triton.jit
def _adamw_kernel(tab_ptr, chunk_ptr, n_tensors, bc_ptr, scale_ptr, inf_ptr, lr, beta1, beta2, lr_wd, eps,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, WRITE_SHADOW: tl.constexpr):
    if tl.load(inf_ptr) == 1.0:  # found_inf: the step is skipped, nothing written
        return
    c = tl.program_id(0)
    i = tl.load(chunk_ptr + 2 * c)
    start = tl.load(chunk_ptr + 2 * c + 1)
    p_ptr = _pointer(tab_ptr, 0, n_tensors, i, tl.float32)
    g_ptr = _pointer(tab_ptr, 1, n_tensors, i, G_DTYPE)
    m_ptr = _pointer(tab_ptr, 2, n_tensors, i, tl.float32)
    v_ptr = _pointer(tab_ptr, 3, n_tensors, i, tl.float32)
    s_ptr = _pointer(tab_ptr, 4, n_tensors, i, S_DTYPE)
    n = tl.load(tab_ptr + 5 * n_tensors + i)
    step_size = tl.div_rn(lr, tl.load(bc_ptr + i))  # lr / bias_correction1
    bc2_sqrt = tl.load(bc_ptr + n_tensors + i)
    for k in range(0, CHUNK, BLOCK):
        first = start + k
        offs = tl.multiple_of(first, BLOCK) + tl.arange(0, BLOCK)
        if first + BLOCK <= n:  # a whole block: unmasked, 16-byte accesses
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, None, lr, beta1, beta2, lr_wd, eps, step_size,
                         bc2_sqrt, scale_ptr, HAS_SCALE, HAS_WD, WRITE_SHADOW)
        elif first < n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, offs < n, lr, beta1, beta2, lr_wd, eps, step_size,
                         bc2_sqrt, scale_ptr, HAS_SCALE, HAS_WD, WRITE_SHADOW)


_CHUNKS: dict = {}


def _chunks(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(tensor index, first element) of each program: fixed by the shapes, kept."""
    key = (numels, device, CHUNK)
    if key not in _CHUNKS:
        _CHUNKS[key] = torch.tensor([(i, s) for i, n in enumerate(numels) for s in range(0, n, CHUNK)],
                                    dtype=torch.int64).to(device)  # a tensor may pass 2**31 elements
    return _CHUNKS[key]


def _pointers(params, grads, exp_avgs, exp_avg_sqs, steps, shadows) -> list[list[int]]:
    """Each list's addresses (the kernel's table), after checking what the kernel assumes."""
    dev = params[0].get_device()
    numels = [p.numel() for p in params]
    named = [("params", params, (torch.float32,)), ("grads", grads, tuple(_TL)),
             ("exp_avgs", exp_avgs, (torch.float32,)), ("exp_avg_sqs", exp_avg_sqs, (torch.float32,))]
    if shadows is not None:
        named.append(("shadows", shadows, (torch.bfloat16, torch.float16)))
    ptrs = []
    for name, xs, dtypes in named:
        if len(xs) != len(params):
            raise ValueError(f"adamw_step: {len(xs)} {name} for {len(params)} params")
        ptr = [x.data_ptr() for x in xs]
        if ([x.numel() for x in xs] != numels or any(a % 16 for a in ptr)
                or not all(x.is_contiguous() and x.get_device() == dev for x in xs)):
            raise ValueError(f"adamw_step: {name} must be contiguous, 16-byte aligned, on the params' device and "
                             f"shaped as their params")
        if xs[0].dtype not in dtypes or any(x.dtype != xs[0].dtype for x in xs):
            raise ValueError(f"adamw_step: {name} must share one dtype of {[str(d) for d in dtypes]}")
        ptrs.append(ptr)
    if len(steps) != len(params) or any(s.numel() != 1 or s.dtype != torch.float32 for s in steps):
        raise ValueError("adamw_step: one one-element float32 step count a param")
    return ptrs + ([] if shadows is not None else [ptrs[0]]) + [numels]


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], shadows: list[torch.Tensor] | None, *,
               lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step of params, exp_avgs and exp_avg_sqs (fp32, in place) from grads (one float
    dtype), as torch._fused_adamw_: the caller has added 1 to steps (one-element fp32 tensors on
    the device, one a param). shadows (bf16 or fp16, or None) get the new params cast to nearest.
    grad_scale (the grads are divided by it) and found_inf (1: the step is skipped, nothing
    written): one-element fp32 tensors on the params' device, or None. Every tensor contiguous
    and 16-byte aligned (what the caching allocator gives)."""
    if not params:
        return
    tab = _pointers(params, grads, exp_avgs, exp_avg_sqs, steps, shadows)  # p, g, m, v, shadow, numel rows
    numels = tuple(tab[-1])
    dev = params[0].device
    # pinned: the copy joins the stream's queue (a pageable one would wait for the queued backward)
    tab = torch.tensor(tab, dtype=torch.int64, pin_memory=dev.type == "cuda").to(dev, non_blocking=True)
    # the bias corrections as torch's kernel makes them: 1 - pow(float(beta), step), the second's sqrt
    step = torch.stack([s if s.dim() == 0 else s.reshape(()) for s in steps])
    bc = torch.stack([1 - torch.full_like(step, beta1).pow(step), (1 - torch.full_like(step, beta2).pow(step)).sqrt()])
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731 (torch's opmath casts)
    zero = torch.zeros((), device=dev)
    chunks = _chunks(numels, dev)
    _adamw_kernel[(chunks.shape[0],)](
        tab, chunks, len(params), bc, grad_scale if grad_scale is not None else zero,
        found_inf if found_inf is not None else zero, f32(lr), f32(beta1), f32(beta2),
        float(torch.tensor(f32(lr), dtype=torch.float32) * f32(weight_decay)), f32(eps), CHUNK=CHUNK, BLOCK=BLOCK,
        G_DTYPE=_TL[grads[0].dtype], S_DTYPE=_TL[shadows[0].dtype] if shadows else tl.bfloat16,
        HAS_SCALE=grad_scale is not None, HAS_WD=weight_decay != 0, WRITE_SHADOW=shadows is not None,
        num_warps=NUM_WARPS, enable_fp_fusion=False)  # every fma written out, as torch's compiled code has them
