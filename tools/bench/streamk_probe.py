"""Stream-K (kernels/miles_kernels/_triton/streamk.py: linear's _linear_streamk_kernel) against the plain persistent
launch of the same tile, linear's pick and cuBLAS: whether balancing a grid whose last wave is short pays.

A persistent grid of P programs splits the T x KI tile K-steps evenly, so a program's range may end inside a tile
and the next program's begin there; the tail program resumes the head's fp32 accumulator, so the bits are linear's
(each row checks them against linear's pick). Stream-K runs where streamk.takes says (P <= T < 6P, T % P != 0);
elsewhere the row is left out. Graph-timed, weights cold.

    PYTHONPATH=src:kernels python tools/bench/streamk_probe.py --out streamk.json
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from miles_kernels._triton import matmul as lin
from miles_kernels._triton import streamk

# M x N x K where 128x128 (or 64x128 at M 256) makes at least a wave: 8B q|k|v and 0.6B gate|up at M 256-512
# (1.45 / 1.09 / 1.45 waves), 8B o at M 640 / 768 / 1,024 (chunked prefill: 1.21 / 1.45 / 1.94), M 1,536 (4.36)
# and 8B gate|up at M 512 (5.8)
SHAPES = [(256, 6144, 4096), (256, 6144, 1024), (384, 6144, 4096), (384, 6144, 1024), (512, 6144, 4096),
          (512, 6144, 1024), (640, 4096, 4096), (768, 4096, 4096), (1024, 4096, 4096), (1536, 6144, 4096),
          (512, 24576, 4096)]
SMALL = lin.Tile(0, 64, 128, 64, 8, 4, 8, True)  # the deep sweep's 64x128: 1.45 waves at M 256 x N 6,144


def _launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, t: lin.Tile, by_streamk: bool) -> None:
    """linear's launch of tile t, by its stream-K kernel or the plain persistent one."""
    on, streamk.STREAM_K = streamk.STREAM_K, by_streamk
    try:
        lin._launch_linear(x, w, None, y, t)
    finally:
        streamk.STREAM_K = on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, nargs="*", default=[5, 4], help="128x128 tile stages to try (and 64x128 s8)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("streamk_probe: needs a CUDA GPU (the kernel is checked on CPU in tests/kernels)")
    sys.path.insert(0, os.path.dirname(__file__))
    from kernel_ops import timings
    from linear_sweep import cold_weights

    dev = torch.device("cuda")
    sms = lin._num_programs(dev)
    rows = []
    print(f"{'M':>5} {'N':>6} {'K':>6} {'run':<24} {'tiles':>5} {'waves':>5} {'same':>4} {'us':>8} {'x_cublas':>8}")
    for M, N, K in SHAPES:
        torch.manual_seed(M + N + K)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
        pick = lin.linear_tile(M, torch.bfloat16, N, dev)
        ref = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        lin._launch_linear(x, w, None, ref, pick)
        wn = cold_weights(w)
        _, base = timings(lambda: F.linear(x, wn()))
        y = torch.empty_like(ref)
        tiles = [pick._replace(max_m=0)] + [t for t in [lin.Tile(0, 128, 128, 64, 8, 8, s, True) for s in a.stages]
                                            + [SMALL] if t != pick._replace(max_m=0)]
        for t, by_streamk in ((t, sk) for t in tiles for sk in (False, True)):
            n_tiles = -(-M // t.block_m) * -(-N // t.block_n)
            if by_streamk and not streamk.takes(n_tiles, min(sms, n_tiles), K):
                continue
            name = f"{'streamk' if by_streamk else 'plain'}_{t.block_m}x{t.block_n}_s{t.num_stages}" + \
                ("_pick" if t == tiles[0] else "")
            call = lambda wt: _launch(x, wt, y, t, by_streamk)  # noqa: E731, B023
            y.zero_()
            call(w)
            torch.cuda.synchronize()
            same = torch.equal(y, ref)
            _, us = timings(lambda: call(wn()))  # noqa: B023
            us = (us or float("nan")) * 1e3
            ratio = base * 1e3 / us if base else float("nan")  # base None: cuBLAS's graph capture failed
            rows.append(dict(M=M, N=N, K=K, run=name, tiles=n_tiles, same=same, us=us,
                             cublas_us=base * 1e3 if base else None, x_cublas=ratio))
            print(f"{M:5} {N:6} {K:6} {name:<24} {n_tiles:>5} {n_tiles / sms:5.2f} {int(same):4} {us:8.2f} "
                  f"{ratio:8.3f}", flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
