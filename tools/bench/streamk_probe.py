"""Stream-K with the K walk handed on in order: whether balancing a 1.45-wave grid pays, keeping linear's bits.

A persistent grid of P programs splits the T x KI tile K-steps evenly (KI = cdiv(K, BLOCK_K)), so a program's
range may end inside a tile (that tile's head: K-steps 0 .. kb) and the next program's begin there (its tail).
Stream-K usually sums the two partial products, which changes the bits; here the tail program resumes the head's
fp32 accumulator instead, so each output element adds its K products in the order a whole tile does, and the
bits are linear's. The hand-off costs no wait: each program computes its head piece first (it depends on
nothing), then its whole tiles, then its tail piece, whose head the previous program finished first thing. Needs
T >= P (each range at least one tile long; below that a tile would pass through several programs in a chain).
Timed beside linear's own launch of the same tile and cuBLAS, graph-timed, weights cold; bits against linear.
`linear_streamk` rows: linear's shipped stream-K kernel (streamk.py, MILES_STREAM_K) on its pick, where it applies.

    PYTHONPATH=src:kernels python tools/bench/streamk_probe.py --out streamk.json
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miles_kernels._triton import matmul as lin
from miles_kernels._triton import streamk
from miles_kernels._triton.matmul import _grouped_order

# M x N x K where 128x128 (or 64x128 at M 256) makes at least a wave: 8B q|k|v and 0.6B gate|up at M 256-512
# (1.45 / 1.09 / 1.45 waves), 8B o at M 640 / 768 / 1,024 (chunked prefill: 1.21 / 1.45 / 1.94), M 1,536 (4.36)
# and 8B gate|up at M 512 (5.8)
SHAPES = [(256, 6144, 4096), (256, 6144, 1024), (384, 6144, 4096), (384, 6144, 1024), (512, 6144, 4096),
          (512, 6144, 1024), (640, 4096, 4096), (768, 4096, 4096), (1024, 4096, 4096), (1536, 6144, 4096),
          (512, 24576, 4096)]
SMALL = lin.Tile(0, 64, 128, 64, 8, 4, 8, True)  # the deep sweep's 64x128: 1.45 waves at M 256 x N 6,144
SPIN = 1 << 22  # polls before a tail gives up (counted in flags[P]: the host refuses that result)


@triton.jit
def _k_steps(x_desc, w_desc, off_m, off_n, k_lo, k_hi, acc, BLOCK_K: tl.constexpr):
    """acc + x @ w^T over K-steps [k_lo, k_hi) of one tile, in order (as matmul._tma_k_walk)."""
    for ki in range(k_lo, k_hi):
        acc = tl.dot(x_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc)
    return acc


@triton.jit
def _streamk_kernel(x_desc, w_desc, y_desc, ws_ptr, flag_ptr, M, N, K, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    SPIN_MAX: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_ki = tl.cdiv(K, BLOCK_K)
    work = n_tiles_m * n_tiles_n * n_ki
    lo = pid * work // NUM_PROGRAMS
    hi = (pid + 1) * work // NUM_PROGRAMS
    slot = ws_ptr + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
    # 1. the head of the tile the range ends in: its accumulator to this program's slot, then the flag
    kb = hi % n_ki
    if kb != 0:
        tile_m, tile_n = _grouped_order(hi // n_ki, n_tiles_m, n_tiles_n, GROUP_M)
        acc = _k_steps(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, 0, kb,
                       tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K)
        tl.store(slot + pid * BLOCK_M * BLOCK_N, acc)
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + pid, 1, sem="release", scope="gpu")
    # 2. the whole tiles
    for tile in range(tl.cdiv(lo, n_ki), hi // n_ki):
        tile_m, tile_n = _grouped_order(tile, n_tiles_m, n_tiles_n, GROUP_M)
        acc = _k_steps(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, 0, n_ki,
                       tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K)
        y_desc.store([tile_m * BLOCK_M, tile_n * BLOCK_N], acc.to(y_desc.dtype))
    # 3. the tail of the tile the range starts in: the previous program's head, resumed
    ka = lo % n_ki
    if ka != 0:
        seen = tl.atomic_add(flag_ptr + pid - 1, 0, sem="acquire", scope="gpu")
        n = 0
        while (seen == 0) & (n < SPIN_MAX):
            seen = tl.atomic_add(flag_ptr + pid - 1, 0, sem="acquire", scope="gpu")
            n += 1
        if seen == 0:
            tl.atomic_add(flag_ptr + NUM_PROGRAMS, 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        acc = tl.load(slot + (pid - 1) * BLOCK_M * BLOCK_N, cache_modifier=".cg")
        tl.atomic_xchg(flag_ptr + pid - 1, 0, sem="relaxed", scope="gpu")  # zero for the next launch
        tile_m, tile_n = _grouped_order(lo // n_ki, n_tiles_m, n_tiles_n, GROUP_M)
        acc = _k_steps(x_desc, w_desc, tile_m * BLOCK_M, tile_n * BLOCK_N, ka, n_ki, acc, BLOCK_K)
        y_desc.store([tile_m * BLOCK_M, tile_n * BLOCK_N], acc.to(y_desc.dtype))


class StreamK:
    """y = x @ w^T by tile t (a TMA tile of linear's tables) in stream-K order over `programs` programs,
    with its workspace (one fp32 tile a program) and flags (one a program, then the time-out count)."""

    def __init__(self, t: lin.Tile, programs: int, device):
        self.t, self.programs = t, programs
        self.ws = torch.empty(programs, t.block_m, t.block_n, dtype=torch.float32, device=device)
        self.flags = torch.zeros(programs + 1, dtype=torch.int32, device=device)

    def tiles(self, M: int, N: int) -> int:
        return triton.cdiv(M, self.t.block_m) * triton.cdiv(N, self.t.block_n)

    def __call__(self, x_MK: torch.Tensor, w_NK: torch.Tensor, y_MN: torch.Tensor) -> None:
        (M, K), N, t = x_MK.shape, w_NK.shape[0], self.t
        if self.tiles(M, N) < self.programs:
            raise ValueError(f"streamk_probe: {self.tiles(M, N)} tiles of {t.block_m}x{t.block_n} at M {M} x N {N} "
                             f"are fewer than the {self.programs} programs; stream-K here needs one tile a program")
        desc = TensorDescriptor.from_tensor
        _streamk_kernel[(self.programs,)](
            desc(x_MK, [t.block_m, t.block_k]), desc(w_NK, [t.block_n, t.block_k]), desc(y_MN, [t.block_m, t.block_n]),
            self.ws, self.flags, M, N, K, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
            NUM_PROGRAMS=self.programs, SPIN_MAX=SPIN, num_warps=t.num_warps, num_stages=t.num_stages)

    def timed_out(self) -> int:
        return int(self.flags[self.programs].item())


def _shipped_streamk(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    """linear's launch of its pick with its stream-K kernel on (matmul._linear_streamk_kernel)."""
    on, streamk.STREAM_K = streamk.STREAM_K, True
    try:
        lin._launch_linear(x, w, None, y, lin.linear_tile(x.shape[0], x.dtype, w.shape[0], x.device))
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
    print(f"{'M':>5} {'N':>6} {'K':>6} {'run':<22} {'tiles':>5} {'waves':>5} {'same':>4} {'us':>8} {'x_cublas':>8}")
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
        tiles = [lin.Tile(0, 128, 128, 64, 8, 8, s, True) for s in a.stages] + [SMALL]
        runs = [(f"pick_{pick.block_m}x{pick.block_n}_s{pick.num_stages}",
                 lambda wt: lin._launch_linear(x, wt, None, y, pick), None)]
        runs += [(f"plain_{t.block_m}x{t.block_n}_s{t.num_stages}",
                  (lambda wt, t=t: lin._launch_linear(x, wt, None, y, t)), None)
                 for t in tiles if t != pick._replace(max_m=0)]
        runs += [(f"streamk_{t.block_m}x{t.block_n}_s{t.num_stages}", sk, sk)
                 for t in tiles for sk in [StreamK(t, sms, dev)] if sk.tiles(M, N) >= sms]
        sk = StreamK(pick._replace(max_m=0), sms, dev)
        if pick.tma and sk.t not in tiles and sk.tiles(M, N) >= sms:
            runs.append((f"streamk_pick_s{pick.num_stages}", sk, sk))
        if pick.tma and streamk.takes(sk.tiles(M, N), sms, K):  # linear's own stream-K kernel (MILES_STREAM_K)
            runs.append(("linear_streamk", lambda wt: _shipped_streamk(x, wt, y), None))
        for name, fn, sk in runs:
            y.zero_()
            call = (lambda wt, fn=fn: fn(x, wt, y)) if sk else fn
            call(w)
            torch.cuda.synchronize()
            same = torch.equal(y, ref)
            _, us = timings(lambda: call(wn()))  # noqa: B023
            us = (us or float("nan")) * 1e3
            stuck = sk.timed_out() if sk else 0
            n_tiles = sk.tiles(M, N) if sk else None
            ratio = base * 1e3 / us if base else float("nan")  # base None: cuBLAS's graph capture failed
            rows.append(dict(M=M, N=N, K=K, run=name, same=same, us=us, cublas_us=base * 1e3 if base else None,
                             x_cublas=ratio, timed_out=stuck))
            waves = f"{n_tiles / sms:5.2f}" if n_tiles else "    -"
            print(f"{M:5} {N:6} {K:6} {name:<22} {n_tiles or '-':>5} {waves} {int(same):4} {us:8.2f} {ratio:8.3f}"
                  + (f"  TIMED OUT x{stuck}" if stuck else ""), flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
