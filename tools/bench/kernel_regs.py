"""Registers, spills and shared memory of our compiled Triton kernels, as the GPU's own
toolchain built them (a CPU compile for sm_90 can differ: without the runtime's divisibility
hints it loses vector loads and spills otherwise).

    python tools/bench/kernel_regs.py OUT.json

Runs the attention kernels once at the shapes that matter (the training forward and backward,
0.6B heads at 16k, K/V by TMA and by pointers; decode at B 64 / 256, ctx 1024, in both decode
tiles, paged caches by pointers and by TMA) and the linears at M = 64 and 16k (0.6B qkv shape),
then lists every kernel FastKernel compiled: its constexprs, warps, stages, shared memory,
registers per thread and spill bytes. Prints a table, writes JSON.
"""

import json
import sys

import torch
import triton

from miles_kernels._triton import attention_bwd as AB
from miles_kernels._triton import decode_attention, elementwise, kv_write, matmul, moe, rows
from miles_kernels._triton import paged_attention as A
from miles_kernels._triton.launch import FastKernel

MODULES = (A, AB, decode_attention, elementwise, kv_write, matmul, moe, rows)
DT = torch.bfloat16


def workload() -> None:
    """One call of each kernel variant worth reading (module docstring)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    L, H, K, D = 16384, 16, 8, 128
    q, k, v = (torch.randn(L, n, D, generator=g, device="cuda").to(DT) for n in (H, K, K))
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    saved = A.KV_TMA, AB.DKDV_TMA, A.PAGED_KV_TMA, A.DECODE_TILE, AB.DQ_TMA
    try:
        for tma in (False, True):
            A.KV_TMA = AB.DKDV_TMA = AB.DQ_TMA = tma
            lse = torch.empty(H, L, device="cuda")
            out = A.packed_attention(q, k, v, cu, L, D**-0.5, lse_HT=lse)
            AB.packed_attention_bwd(q, k, v, out, torch.randn_like(out), lse, cu, L, D**-0.5)
        for B, ctx, page in ((64, 1024, 64), (256, 1024, 64)):
            n = ctx // page
            kc = torch.randn(B * n, page, K, D, device="cuda", dtype=DT)
            qd = torch.randn(B, H, D, device="cuda", dtype=DT)
            bt = torch.arange(B * n, device="cuda", dtype=torch.int32).view(B, n)
            kv = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
            for tile in ("rows", "swapped"):
                for tma in (False, True):
                    A.DECODE_TILE, A.PAGED_KV_TMA = tile, dict.fromkeys(saved[2], tma)
                    A.attention(qd, kc, kc, torch.arange(B + 1, device="cuda", dtype=torch.int32), kv, bt, 1, D**-0.5)
    finally:
        A.KV_TMA, AB.DKDV_TMA, A.PAGED_KV_TMA, A.DECODE_TILE, AB.DQ_TMA = saved
    w = torch.randn(4096, 1024, device="cuda", dtype=DT)
    for M in (64, 16384):
        matmul.linear(torch.randn(M, 1024, device="cuda", dtype=DT), w)
    torch.cuda.synchronize()


def compiled() -> list[dict]:
    """Every kernel the FastKernels of MODULES hold: name, constexprs, launch, registers, spills."""
    rows_ = []
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if not isinstance(obj, FastKernel):
                continue
            for (device, (pos, kw)), kernel in obj.kernels.items():
                kernel._init_handles()
                md = kernel.metadata
                consts = {k: v for k, v in kw if isinstance(k, str) and k.isupper()}
                rows_.append(dict(kernel=f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", consts=consts,
                                  num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                                  regs=kernel.n_regs, spills=kernel.n_spills))
    return rows_


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    workload()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               kernels=compiled())
    print(f"{'kernel':40} {'warps':>5} {'stages':>6} {'smem KB':>7} {'regs':>4} {'spill B':>7}  constexprs")
    for r in res["kernels"]:
        print(f"{r['kernel']:40} {r['num_warps']:5} {r['num_stages']:6} {r['shared'] / 1024:7.1f} {r['regs']:4} "
              f"{r['spills']:7}  " + " ".join(f"{k}={v}" for k, v in r["consts"].items()), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
