"""Host cost of one launch, per kind of kernel call the trainer makes (one GPU).

    PYTHONPATH=src:kernels python tools/bench/launch_cost.py --out launch_cost.json [--cprofile N]

Issues each call 300 times on a tiny problem (the GPU keeps up), times the host, then the
same calls replayed from a CUDA graph (the GPU time). The kinds: cuBLAS F.linear, our linear
on the pointer kernel, on the TMA kernel with host-built descriptors, and on a TMA kernel
that builds its descriptors on the device (tl.make_tensor_descriptor), mk.linear and
rms_norm (each also through Triton's own launch path, which launch.FastKernel skips), and a
torch elementwise op. Prints a table and writes JSON; --cprofile N also prints where the host time
of N calls of mk.linear and of mk.rms_norm goes (cProfile, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import miles_kernels as mk
from miles_kernels._triton import launch, matmul as lin
from miles_kernels._triton.matmul import _grouped_order

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402


@triton.jit
def _linear_devdesc_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # _linear_tma_kernel with device-built descriptors (contiguous x, w, y).
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles_m * n_tiles_n, NUM_PROGRAMS, flatten=True):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        off_m, off_n = tile_m * BLOCK_M, tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def devdesc_linear(x, w, t):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_prog = min(lin._num_programs(x.device), triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n))
    _linear_devdesc_kernel[(n_prog,)](x, w, y, M, N, K, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                                      GROUP_M=t.group_m, NUM_PROGRAMS=n_prog, num_warps=t.num_warps,
                                      num_stages=t.num_stages)
    return y


def tritons_path(fn):
    """fn with our kernels launched through Triton's JITFunction.run (launch.ENABLED off)."""
    def f():
        launch.ENABLED = False
        try:
            return fn()
        finally:
            launch.ENABLED = True
    return f


def host_us(fn, n=300) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * host / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="cProfile N calls of the ops")
    a = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    dt = torch.bfloat16
    x = torch.randn(256, 1024, device="cuda", dtype=dt)
    w = torch.randn(1024, 1024, device="cuda", dtype=dt) / 32
    big = lin.LINEAR_TILES[dt][-1]
    ptr, tma = big._replace(tma=False), big._replace(tma=True)

    def ours(t):
        def f():
            y = torch.empty(256, 1024, dtype=dt, device="cuda")
            lin._launch_linear(x, w, None, y, t)
            return y
        return f

    y_ref = ours(ptr)()
    same = torch.equal(devdesc_linear(x, w, big), y_ref) and torch.equal(ours(tma)(), y_ref)
    norm_w = torch.ones(1024, device="cuda", dtype=dt)
    cases = {
        "cuBLAS F.linear": lambda: F.linear(x, w),
        "mk linear, pointer kernel": ours(ptr),
        "mk linear, TMA, host descriptors": ours(tma),
        "mk linear, TMA, device descriptors": lambda: devdesc_linear(x, w, big),
        "mk.linear (the op, tile by shape)": lambda: mk.linear(x, w),
        "mk.linear, Triton's launch path": tritons_path(lambda: mk.linear(x, w)),
        "mk.rms_norm": lambda: mk.rms_norm(x, norm_w, 1e-6),
        "mk.rms_norm, Triton's launch path": tritons_path(lambda: mk.rms_norm(x, norm_w, 1e-6)),
        "torch x * 2": lambda: x * 2,
    }
    rows = []
    print(f"{'call':<40} {'host us':>8} {'gpu us':>8}   (devdesc == pointer == host TMA bits: {same})")
    for name, fn in cases.items():
        h = host_us(fn)
        _, g = timings(fn)
        rows.append(dict(call=name, host_us=h, gpu_us=1e3 * g if g else None))
        print(f"{name:<40} {h:8.1f} {1e3 * g if g else float('nan'):8.1f}", flush=True)
    profiles = {}
    for name in ("mk.linear (the op, tile by shape)", "mk.rms_norm") if a.cprofile else ():
        fn = cases[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.cprofile):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        profiles[name] = text.getvalue()
        print(f"--- {name}: {a.cprofile} calls\n{profiles[name]}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"profiles": profiles, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "same_bits": same, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
