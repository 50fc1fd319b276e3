"""Which kernels cuBLAS runs for the decode linears (M 64-512, Qwen3-0.6B / 8B shapes), and ours beside them.

Our linear walks all of K in one program a tile (no split-K: the K order must not change with M). Where it is
short of cuBLAS at M 128-512 the question is what cuBLAS does there: split-K (a reduce kernel after the GEMM, or
a split in the kernel's name), a stream-K schedule, clusters, which tile. This profiles eight calls of each with the
weights cold (each call reads a copy the last calls left out of L2, as the decode step meets them) and prints,
a shape a line, the kernels of each side with their device us, then writes JSON.

    PYTHONPATH=src:kernels python tools/bench/cublas_kernels.py --out cublas_kernels.json [--ms 64 128 256 512]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from linear_sweep import cold_weights  # noqa: E402

SHAPES = {"0.6b": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)],  # q|k|v, o, gate|up, down (N, K)
          "8b": [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]}
CALLS = 8  # profiled calls a side; the kernels' times are their medians


def kernels_of(fn) -> list[dict]:
    """[{name, us}] of the GPU kernels one call of fn launches (median device time over CALLS profiled calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    seen: dict[str, list[float]] = {}
    for e in prof.events():  # the kernels themselves (device-side events), not the CPU ops that launched them
        us = e.time_range.elapsed_us()
        if e.device_type == torch.autograd.DeviceType.CUDA and us > 0 and "memcpy" not in e.name.lower():
            seen.setdefault(e.name, []).append(us)
    return [dict(name=n, calls=len(t), us=sorted(t)[len(t) // 2]) for n, t in seen.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cublas_kernels.json")
    ap.add_argument("--ms", type=int, nargs="+", default=[64, 128, 256, 512])
    a = ap.parse_args()
    if any(m < 1 for m in a.ms):
        raise SystemExit(f"cublas_kernels: --ms must be positive row counts, got {a.ms}")
    if not torch.cuda.is_available():
        raise SystemExit("cublas_kernels: needs a CUDA GPU (it profiles cuBLAS against miles_kernels' linear)")
    import miles_kernels as mk

    rows = []
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
            nxt = cold_weights(w)
            for m in a.ms:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                row = dict(model=model, M=m, N=n, K=k, cublas=kernels_of(lambda: F.linear(x, nxt())),  # noqa: B023
                           ours=kernels_of(lambda: mk.linear(x, nxt())))  # noqa: B023
                for side in ("cublas", "ours"):
                    if not row[side]:
                        raise SystemExit(f"cublas_kernels: the profiler saw no {side} kernel at M {m} N {n} K {k}")
                    row[f"{side}_us"] = sum(kk["us"] * kk["calls"] / CALLS for kk in row[side])
                rows.append(row)
                print(f"{model:4} M={m:4} N={n:5} K={k:5}  cuBLAS {row['cublas_us']:6.1f} us"
                      f"  ours {row['ours_us']:6.1f} ({row['cublas_us'] / row['ours_us']:.2f}x cuBLAS)", flush=True)
                for kk in row["cublas"]:
                    print(f"      cuBLAS {kk['us']:6.1f} us x{kk['calls'] / CALLS:.0f}  {kk['name'][:150]}", flush=True)
                for kk in row["ours"]:
                    print(f"      ours   {kk['us']:6.1f} us x{kk['calls'] / CALLS:.0f}  {kk['name'][:150]}", flush=True)
            torch.cuda.empty_cache()
    json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
