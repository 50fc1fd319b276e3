"""A fixed K partition of the long-K, narrow projections (o, down) with the partial sums added inside
the add_rms_norm that reads them: what the decode step would gain, measured before any change to the
numerics.

At M 64 the o and down linears (0.6B: N 1024, K 2048 / 3072) have few column tiles, and each tile walks
all of K. The 2026-12-03 run (docs/kernel_tuning.md, "the fixed K partition") split K into fixed chunks,
one program for each (tile, chunk), then summed the chunks in order in a launch of its own (2.2 us). It saved
0-3.5 us a linear, the sum launch took most of that back, and it was dropped. Every o / down output of a
dense block is read only by an add_rms_norm (models/layers.py, Block.forward: the residual pair), so the
sum can be done there. This probe times the step three ways, as CUDA graphs replayed by turns (as
step_peer times ours):

    shipped  the engine's decode graph body today (split_probe's `whole`)
    split    o / down at M <= 64 as fp32 chunk partials (`_part_kernel`), the ordered sum rounded to the
             activations' dtype in a launch of its own (`_sum_kernel`), then the shipped add_rms_norm
    fold     the same partials read by `_fold_kernel`: the ordered sum, the rounding, the residual add and
             the norm in one launch (the shipped add_rms_norm's row code, so the same bits as split)

and checks that fold's logits equal split's bit for bit. Weights [N, K] with N <= --max-n and K >= --min-k
are partitioned, in chunks of --chunk (a multiple of 64). Each partitioned shape takes the fastest of the
column widths in --block-n, timed alone first. This is the decode side only: the trainer would have to sum
the same chunks in the same order (in its GEMM's epilogue, two accumulators: +10-12% on those GEMMs at
M 4k-16k in the 2026-12-03 run) for the engine's bits to stay the trainer's. Without a GPU it refuses; its
kernels are checked on the CPU under the interpreter (tests/kernels: check_fold_probe).

    PYTHONPATH=src:kernels python tools/bench/fold_probe.py --model qwen3-0.6b --shapes 64x256 --out fold.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from miles_kernels._triton import launch  # noqa: E402
from miles_kernels._triton.elementwise import _rms_norm_row, _row_warps  # noqa: E402
from miles_kernels._triton.gdc import gdc_release, gdc_wait, prefetch_rows  # noqa: E402
from miles_kernels._triton.launch import fast_launch  # noqa: E402
from miles_kernels._triton.matmul import _dot_precision, _k_walk  # noqa: E402

MAX_M = 64  # rows up to which a partitioned projection returns partials (the decode step at b <= 64)


@fast_launch
@triton.jit
def _part_kernel(x_ptr, w_ptr, p_ptr, M, N, K, CHUNK, stride_xm, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 K_UNROLL: tl.constexpr, USE_GDC: tl.constexpr = False):
    """Program (tile, c): chunk c of K ([c CHUNK, (c + 1) CHUNK)) walked from zero as linear's tiles walk
    K (matmul._k_walk), stored in fp32 to p[c] ([n_chunks, M, N])."""
    tile, c = tl.program_id(0), tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = c * CHUNK
    k_len = tl.minimum(CHUNK, K - k_lo)
    prefetch_rows(w_ptr + k_lo, cols, N, stride_wn, k_len, 256, USE_GDC)
    gdc_wait(USE_GDC)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + k_lo + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + k_lo + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = _k_walk(x_ptrs, w_ptrs, rows < M, cols < N, k_len, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, K_UNROLL)
    gdc_release(USE_GDC)
    p_ptrs = p_ptr + (c.to(tl.int64) * M + rows[:, None]) * N + cols[None, :]
    tl.store(p_ptrs, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _chunk_sum(p_ptr, row, M, N, n_chunks, cols, mask, BLOCK: tl.constexpr):
    """Row `row` of 0 + p[0] + p[1] + ... in fp32, in chunk order (elementwise: no layout orders it)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(p_ptr + (c * M + row) * N + cols, mask=mask, other=0.0)
    return acc


@fast_launch
@triton.jit
def _sum_kernel(p_ptr, y_ptr, M, N, n_chunks, BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr = False):
    """y = the chunks' ordered sum rounded to y's dtype: split's launch of its own, a row a program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    gdc_wait(USE_GDC)
    acc = _chunk_sum(p_ptr, row, M, N, n_chunks, cols, mask, BLOCK_N)
    gdc_release(USE_GDC)
    tl.store(y_ptr + row * N + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _fold_kernel(p_ptr, r_ptr, w_ptr, h_ptr, y_ptr, M, D, n_chunks, stride_r, stride_h, stride_y, eps,
                 BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr = False):
    """(h, y) = (round(sum of the chunks) + r, rms_norm(h)): _sum_kernel's rounding, then
    elementwise._add_rms_norm_kernel's row (the same add and _rms_norm_row at the same warps)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gdc_wait(USE_GDC)
    acc = _chunk_sum(p_ptr, row, M, D, n_chunks, cols, mask, BLOCK_D)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_release(USE_GDC)
    x = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)  # the shipped kernel's x + r: the fp32 sum, one rounding
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    _rms_norm_row(h.to(tl.float32), w_ptr, y_ptr + row * stride_y, cols, mask, D, eps, h_ptr)


class Partials:
    """A partitioned projection's output: p [n_chunks, M, N] fp32 chunk sums, and the dtype it stands for."""

    def __init__(self, p: torch.Tensor, dtype: torch.dtype):
        self.p, self.dtype = p, dtype


def partials(x: torch.Tensor, w: torch.Tensor, chunk: int, block_n: int) -> Partials:
    """x [M, K] @ w [N, K]^T as the chunks' fp32 sums: one program a (64 x block_n tile, chunk)."""
    M, K = x.shape
    N = w.shape[0]
    if chunk % 64 or chunk >= K:
        raise ValueError(f"fold_probe: chunk {chunk} must be a multiple of 64 below K {K}")
    x = x.contiguous()
    n_chunks = triton.cdiv(K, chunk)
    p = torch.empty((n_chunks, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, 64) * triton.cdiv(N, block_n), n_chunks)
    _part_kernel[grid](x, w, p, M, N, K, chunk, x.stride(0), w.stride(0), BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=64,
                       PRECISION=_dot_precision(x.dtype),
                       K_UNROLL=2 if block_n <= 32 else 1, USE_GDC=launch.gdc_rows(x, M),
                       num_warps=4, num_stages=8 if block_n <= 16 else 6)
    return Partials(p, x.dtype)


def chunk_sum(parts: Partials) -> torch.Tensor:
    """The partials' ordered sum, rounded to their dtype (split's own launch)."""
    n_chunks, M, N = parts.p.shape
    y = torch.empty((M, N), dtype=parts.dtype, device=parts.p.device)
    _sum_kernel[(M,)](parts.p, y, M, N, n_chunks, BLOCK_N=triton.next_power_of_2(N),
                      USE_GDC=launch.gdc_rows(y, M, launch.PDL_NORM_MAX_ROWS), num_warps=_row_warps(N))
    return y


def fold_add_rms_norm(parts: Partials, r: torch.Tensor, w: torch.Tensor, eps: float):
    """(h, y) of add_rms_norm(chunk_sum(parts), r, w, eps) in one launch."""
    n_chunks, M, D = parts.p.shape
    r = r.contiguous()
    h = torch.empty((M, D), dtype=r.dtype, device=r.device)
    y = torch.empty((M, D), dtype=torch.result_type(r, w), device=r.device)
    block_d = triton.next_power_of_2(D)
    _fold_kernel[(M,)](parts.p, r, w.contiguous(), h, y, M, D, n_chunks, r.stride(0), h.stride(0), y.stride(0), eps,
                       BLOCK_D=block_d, USE_GDC=launch.gdc_rows(r, M, launch.PDL_NORM_MAX_ROWS),
                       num_warps=_row_warps(block_d))
    return h, y


def partitioned(model, max_n: int, min_k: int, chunk: int) -> list:
    """The dense blocks' o and down Linear modules whose [N, K] weight is partitioned."""
    mods = []
    for layer in model.layers:
        for m in (layer.attn.wo, getattr(getattr(layer, "mlp", None), "w_down", None)):
            if m is not None and m.bias is None and m.weight.shape[0] <= max_n and m.weight.shape[1] >= min_k \
                    and m.weight.shape[1] > chunk:
                mods.append(m)
    return mods


@contextlib.contextmanager
def patched(model, mode: str, picks: dict, chunk: int, mods: list):
    """Within: the partitioned modules return Partials at M <= MAX_M (picks: weight shape -> block_n),
    and RMSNorm.add_forward takes them (`split`: chunk_sum then add_rms_norm; `fold`: fold_add_rms_norm)."""
    from miles_fsdp.models import layers

    ids = {id(m) for m in mods}
    lin_fwd, add_fwd = layers.Linear.forward, layers.RMSNorm.add_forward

    def linear_forward(self, x):
        if id(self) in ids and x.shape[0] <= MAX_M:
            return partials(x, self.weight, chunk, picks[tuple(self.weight.shape)])
        return lin_fwd(self, x)

    def add_forward(self, delta, x):
        if isinstance(delta, Partials):
            if mode == "fold":
                return fold_add_rms_norm(delta, x, self.weight, self.eps)
            delta = chunk_sum(delta)
        return add_fwd(self, delta, x)

    layers.Linear.forward, layers.RMSNorm.add_forward = linear_forward, add_forward
    try:
        yield
    finally:
        layers.Linear.forward, layers.RMSNorm.add_forward = lin_fwd, add_fwd


def pick_block_n(shapes: set, batch: int, chunk: int, widths: list[int], reps: int, rounds: int) -> dict:
    """{(N, K): (block_n, us)}: each partitioned shape's fastest column width, graph-timed alone (weights cycled
    over copies that outgrow L2, as the step reads each layer's weights once)."""
    from split_probe import graphed, time_rounds

    out = {}
    for n, k in sorted(shapes):
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(16)]
        graphs = {bn: graphed(lambda bn=bn: [partials(x, w, chunk, bn) for w in ws])[0] for bn in widths}
        us = {bn: t / len(ws) for bn, t in time_rounds(graphs, reps, rounds).items()}
        best = min(us, key=us.get)
        out[n, k] = (best, us[best])
        print(f"  partials N {n} K {k} M {batch}: " + ", ".join(f"n{bn} {t:.2f} us" for bn, t in us.items()),
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["qwen3-0.6b"])
    ap.add_argument("--shapes", nargs="+", default=["64x256"], metavar="BxCTX",
                    help=f"batch (at most {MAX_M}) x context (tokens cached a sequence)")
    ap.add_argument("--chunk", type=int, nargs="+", default=[512, 1024], help="K chunk lengths to time (x 64)")
    ap.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64], help="column widths to pick from")
    ap.add_argument("--max-n", type=int, default=2048)
    ap.add_argument("--min-k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="fold_probe.json")
    a = ap.parse_args()
    from split_probe import check_models, parse_shapes

    shapes = parse_shapes("fold_probe", a.shapes)
    check_models("fold_probe", a.model)
    if any(b > MAX_M for b, _ in shapes):
        raise SystemExit(f"fold_probe: --shapes {a.shapes}: the batch must be 1..{MAX_M} (partials are for decode)")
    if any(c % 64 or c <= 0 for c in a.chunk) or any(bn not in (16, 32, 64, 128) for bn in a.block_n):
        raise SystemExit(f"fold_probe: --chunk {a.chunk} must be multiples of 64; --block-n {a.block_n} of "
                         "16, 32, 64, 128")
    if not torch.cuda.is_available():
        raise SystemExit("fold_probe: needs a CUDA GPU (it times CUDA graph replays); its kernels are checked "
                         "on the CPU by tests/kernels (check_fold_probe)")
    from engine import build
    from split_probe import decode_inputs, graphed, make_forwards, time_rounds

    rows = []
    for name in a.model:
        model = build(name)
        for batch, ctx in shapes:
            for chunk in a.chunk:
                mods = partitioned(model, a.max_n, a.min_k, chunk)
                if not mods:
                    print(f"{name}: no o / down weight with N <= {a.max_n}, K >= {a.min_k} and K > {chunk}")
                    continue
                picks = pick_block_n({tuple(m.weight.shape) for m in mods}, batch, chunk, a.block_n, a.reps,
                                     a.rounds)
                inputs = decode_inputs(model, batch, ctx, 64)
                step = make_forwards(model, *inputs, 1)["whole"]
                graphs, outs = {}, {}
                for mode in ("shipped", "split", "fold"):
                    with patched(model, mode, {s: bn for s, (bn, _) in picks.items()}, chunk,
                                 mods if mode != "shipped" else []):
                        graphs[mode], outs[mode] = graphed(step)
                us = time_rounds(graphs, a.reps, a.rounds)
                for mode in ("shipped", "split", "fold"):  # captured outputs hold values only once replayed
                    graphs[mode].replay()
                    torch.cuda.synchronize()
                    outs[mode] = outs[mode].float().clone()
                same = torch.equal(outs["fold"], outs["split"])
                moved = (outs["fold"] - outs["shipped"]).abs().max().item()
                r = dict(model=name, batch=batch, ctx=ctx, chunk=chunk, partitioned=len(mods),
                         picks={f"{n}x{k}": dict(block_n=bn, us=t) for (n, k), (bn, t) in picks.items()},
                         fold_same_as_split=same, logits_max_diff_vs_shipped=moved,
                         **{f"{m}_us": t for m, t in us.items()})
                rows.append(r)
                print(f"{name} b{batch} ctx{ctx} chunk {chunk} ({len(mods)} projections): shipped {us['shipped']:.1f} "
                      f"us, split {us['split']:.1f} ({us['shipped'] / us['split']:.3f}x), fold {us['fold']:.1f} "
                      f"({us['shipped'] / us['fold']:.3f}x); fold's logits {'==' if same else '!='} split's, "
                      f"{moved:.3g} at most from shipped's",
                      flush=True)
                del graphs, outs, step, inputs
                torch.cuda.empty_cache()
                Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
        del model
        torch.cuda.empty_cache()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
