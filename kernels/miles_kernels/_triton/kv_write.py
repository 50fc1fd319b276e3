"""write_kv on CUDA: the new tokens' K and V stored at their cache slots in one launch
(two index_copy_ kernels otherwise, each a few microseconds in every layer of a decode
step). A copy: the same bits however it is done."""

import torch
import triton
import triton.language as tl

from miles_kernels._triton.launch import fast_launch


@fast_launch
@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, K, D, stride_kt, stride_kh, stride_vt, stride_vh,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    hs = tl.arange(0, BLOCK_K)[:, None]
    ds = tl.arange(0, BLOCK_D)[None, :]
    mask = (hs < K) & (ds < D)
    dst = slot * K * D + hs * D + ds
    k = tl.load(k_ptr + t * stride_kt + hs * stride_kh + ds, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + hs * stride_vh + ds, mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache_PSKD, v_cache_PSKD, k_TKD, v_TKD, slot_T) -> None:
    """k/v [T, K, D] (any token and head strides, unit last stride) into contiguous caches
    [P, S, K, D] at flat slots slot_T [T]; no autograd."""
    T, K, D = k_TKD.shape
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        k_TKD, v_TKD, k_cache_PSKD, v_cache_PSKD, slot_T, K, D,
        k_TKD.stride(0), k_TKD.stride(1), v_TKD.stride(0), v_TKD.stride(1),
        BLOCK_K=triton.next_power_of_2(K), BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
