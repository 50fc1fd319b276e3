"""linears (q|k|v) and swiglu (gate|up with silu_mul) at decode sizes: the 128-row small-M tiles by TMA
(fused_linears.SMALL_M_TMA on) against the same tiles by pointers, and cuBLAS's one GEMM of the
summed N (the peer: what fast mode's fused weight would cost), weights cold (each call reads a copy the
last calls did not leave in L2) and graph-timed, the way the engine's decode graphs run them. TMA and
pointer outputs must be bitwise equal; a row that is not is marked and counts as a failure.

    PYTHONPATH=src:kernels python tools/bench/fused_linears.py --out fused_linears.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from miles_kernels._triton import fused_linears as fl
from miles_kernels._triton import matmul

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

COLD_BYTES = 256 << 20  # five times the H200's L2
# (model, op, output widths, K): q|k|v as three weights, gate|up as two
SHAPES = [("0.6b", "qkv", (2048, 1024, 1024), 1024), ("0.6b", "gate_up", (3072, 3072), 1024),
          ("8b", "qkv", (4096, 1024, 1024), 4096), ("8b", "gate_up", (12288, 12288), 4096)]
MS = (128, 256, 512)


def cycled(make, n_bytes: int):
    """A function returning the next of enough copies of make()'s tensors (>= COLD_BYTES in all)."""
    first = make()
    copies = [first] + [tuple(w.clone() for w in first) for _ in range(-(-COLD_BYTES // n_bytes) - 1)]
    at = [0]

    def nxt():
        at[0] = (at[0] + 1) % len(copies)
        return copies[at[0]]
    return nxt


def run_shape(model: str, op: str, ns: tuple, K: int, M: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(M + K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w_bytes = sum(ns) * K * 2
    ws = cycled(lambda: tuple(torch.randn(n, K, device="cuda", dtype=torch.bfloat16, generator=g) * K**-0.5
                              for n in ns), w_bytes)
    cat = cycled(lambda: (torch.randn(sum(ns), K, device="cuda", dtype=torch.bfloat16, generator=g) * K**-0.5,),
                 w_bytes)
    call = (lambda w: fl.swiglu(x, *w)) if op == "gate_up" else (lambda w: torch.cat(fl.linears(x, w), 1))
    tile = matmul.linear_tile(M, x.dtype, sum(ns), x.device)
    row = dict(model=model, op=op, M=M, N=list(ns), K=K, tile=list(tile))
    w0 = ws()
    outs, saved = {}, fl.SMALL_M_TMA
    for by_tma in (True, False):
        fl.SMALL_M_TMA = by_tma
        try:
            outs[by_tma] = call(w0)
            launched, graph = timings(lambda: call(ws()))
        finally:
            fl.SMALL_M_TMA = saved
        row["tma_ms" if by_tma else "ptr_ms"] = graph or launched
    row["same"] = bool(torch.equal(outs[True], outs[False]))
    launched, graph = timings(lambda: F.linear(x, cat()[0]))
    row["cublas_ms"] = graph or launched
    row["x_cublas_tma"] = row["cublas_ms"] / row["tma_ms"]
    row["x_cublas_ptr"] = row["cublas_ms"] / row["ptr_ms"]
    row["tma_vs_ptr"] = row["ptr_ms"] / row["tma_ms"]
    row["hbm_gbs_tma"] = (w_bytes + M * K * 2 + M * sum(ns) * 2) / row["tma_ms"] / 1e6
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--m", type=int, nargs="+", default=list(MS), help="rows (decode batch sizes)")
    a = ap.parse_args()
    bad = [m for m in a.m if not 1 <= m <= matmul.SMALL_M]
    if bad:
        raise SystemExit(f"fused_linears: --m {bad}: linears and swiglu fuse at 1 <= M <= {matmul.SMALL_M}")
    if not torch.cuda.is_available():
        raise SystemExit("fused_linears: needs a CUDA device")
    rows = []
    print(f"{'model':6} {'op':8} {'M':>4} {'tile':>12} {'TMA ms':>8} {'ptr ms':>8} {'cuBLAS':>8} "
          f"{'x cuBLAS':>8} {'(ptr)':>6} {'TMA/ptr':>7} {'GB/s':>6} same", flush=True)
    for model, op, ns, K in SHAPES:
        for M in a.m:
            r = run_shape(model, op, ns, K, M)
            rows.append(r)
            t = r["tile"]
            print(f"{model:6} {op:8} {M:4} {f'{t[1]}x{t[2]} s{t[6]}' + (' T' if t[7] else ''):>12} "
                  f"{r['tma_ms']:8.4f} {r['ptr_ms']:8.4f} {r['cublas_ms']:8.4f} {r['x_cublas_tma']:8.2f} "
                  f"{r['x_cublas_ptr']:6.2f} {r['tma_vs_ptr']:7.2f} {r['hbm_gbs_tma']:6.0f} {int(r['same'])}",
                  flush=True)
    dev = torch.cuda.get_device_name()
    json.dump(dict(device=dev, rows=rows), open(a.out, "w"), indent=1)
    print(f"{dev}; wrote {a.out}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
