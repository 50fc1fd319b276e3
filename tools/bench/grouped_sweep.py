"""Sweep grouped_linear (MoE experts) tiles on one GPU against two peers in the same run.

    PYTHONPATH=src:kernels python tools/bench/grouped_sweep.py --out grouped.json
    PYTHONPATH=kernels python tools/bench/grouped_sweep.py --compile-only  # CPU, triton 3.6: sm_90 builds

Shapes: Qwen3-30B-A3B's experts (128 x [1536 | 2048, ...], top-8, 4,096 tokens) and the
equal-active MoE of tools/bench/train.py (64 experts of 384, top-8, at 4,096 tokens and at a
64-sequence decode step), routed uniformly and by a skewed router. Every candidate tile must
give the reference tile's bits (same BLOCK_K walk) before it is timed. Peers: one dense
cuBLAS matmul of the same FLOPs (what the issue's target is stated against) and torch's
grouped GEMM (`torch._grouped_mm`, CUTLASS; not batch-invariant). The roofline too: the op must read
every routed expert's weights, which the dense peer does not (30B-A3B down on an H100: 196 us of
bytes at the measured copy rate against the peer's 152 us), so x_roof (roofline time / ours, from the
measured matmul and copy peaks) says how far a tile is from what the GPU allows. The op's row: grouped_linear
itself (its pick and the zero fill). Gluon rows: the TMA tiles by gluon_grouped's warp-specialized
kernel (matmul.GLUON_GROUPED) at each ring depth, checked bitwise against the Triton kernel first.
Prints a table, writes JSON.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from miles_kernels._triton import matmul as lin

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import measure_peaks, timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

T = lin.Tile
REF = T(0, 128, 128, 64, 1, 8, 4)  # the only tile before 2026-12-02's seventh run
CFGS = [
    REF, T(0, 128, 256, 64, 2, 8, 3, True), T(0, 128, 256, 64, 1, 8, 3, True), T(0, 128, 256, 64, 4, 8, 3, True),
    T(0, 128, 256, 64, 2, 8, 4, True), T(0, 128, 128, 64, 2, 8, 4, True), T(0, 128, 128, 64, 2, 4, 4, True),
    T(0, 256, 128, 64, 2, 8, 3, True), T(0, 64, 256, 64, 2, 4, 3, True),
    T(0, 64, 128, 64, 2, 4, 4), T(0, 64, 128, 64, 2, 4, 5), T(0, 64, 64, 64, 2, 4, 4), T(0, 64, 256, 64, 2, 8, 3),
]
# the TMA tiles again by gluon_grouped's kernel, (tile, ring slots); the Triton rows run with GLUON_GROUPED off
GLUON_CFGS = [(T(0, 128, 256, 64, g, 8, 3, True), s) for g in (1, 2, 4) for s in (2, 3, 4)] + [
    (T(0, 128, 128, 64, 2, 8, 4, True), s) for s in (3, 4, 6)]
# (name, E, N, K, tokens, top-k)
SHAPES = [
    ("30b-a3b/gate_up", 128, 1536, 2048, 4096, 8),
    ("30b-a3b/down", 128, 2048, 768, 4096, 8),
    ("a-0.6b/gate", 64, 384, 1024, 4096, 8),
    ("a-0.6b/down", 64, 1024, 384, 4096, 8),
    ("a-0.6b/gate/decode64", 64, 384, 1024, 64, 8),
    ("a-0.6b/down/decode64", 64, 1024, 384, 64, 8),
]


def routed_sizes(E: int, tokens: int, k: int, skew: float, g: torch.Generator) -> torch.Tensor:
    """Rows per expert of tokens x top-k routing; skew > 0 favours low expert ids (a real router's imbalance)."""
    logits = torch.randn(tokens, E, generator=g) + skew * torch.linspace(1, 0, E)
    ids = logits.topk(k, -1).indices.reshape(-1)
    return torch.bincount(ids, minlength=E)


_OP: tuple | None = None  # the package's (GLUON_GROUPED, gluon_grouped.STAGES), read before the sweep sets them


def set_gluon(stages) -> None:
    """TMA tiles by gluon_grouped's kernel with `stages` ring slots; None: by the Triton kernel;
    "op": the package's defaults."""
    global _OP
    from miles_kernels._triton import gluon_grouped as GG

    if _OP is None:
        _OP = (lin.GLUON_GROUPED, GG.STAGES)
    lin.GLUON_GROUPED = _OP[0] if stages == "op" else stages is not None
    GG.STAGES = _OP[1] if stages in (None, "op") else stages


def roof_ms(sizes: torch.Tensor, N: int, K: int, peak: dict) -> float:
    """The op's roofline: its FLOPs at the matmul peak or its bytes (the routed experts' weights, x
    and y, bf16) at the copy peak, whichever takes longer."""
    R = int(sizes.sum())
    bytes_ = 2 * (int((sizes > 0).sum()) * N * K + R * K + R * N)
    return max(2 * R * N * K / peak["tflops"] / 1e9, bytes_ / peak["hbm_gbps"] / 1e6)


def run(rows, shapes, cfgs, gluon_cfgs, gluon: bool, peak: dict):
    g = torch.Generator().manual_seed(0)
    for name, E, N, K, tokens, k in shapes:
        for skew in (0.0, 2.0):
            sizes = routed_sizes(E, tokens, k, skew, g)
            R = int(sizes.sum())
            x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
            offs = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
            offs[1:] = sizes.cumsum(0).cuda()
            dense = timings(lambda: F.linear(x, w[0]))  # noqa: B023  (same FLOPs, one weight: an upper bound)
            gmm = timings(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs[1:]))  # noqa: B023
            ref = torch.zeros(R, N, device="cuda", dtype=torch.bfloat16)
            if gluon:
                set_gluon(None)
            lin.launch_grouped(x, w, offs, ref, REF)
            base = dict(shape=name, E=E, N=N, K=K, R=R, skew=skew, max_rows=int(sizes.max()),
                        dense_ms=dense[1] or dense[0], grouped_mm_ms=gmm[1] or gmm[0],
                        roof_ms=roof_ms(sizes, N, K, peak))
            for c, stages in [(c, None) for c in cfgs] + (gluon_cfgs if gluon else []):
                if gluon:
                    set_gluon(stages)
                y = torch.zeros_like(ref)
                try:
                    lin.launch_grouped(x, w, offs, y, c)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - report and go on
                    rows.append(dict(base, cfg=list(c), gluon_stages=stages, err=str(e)[:200]))
                    print(f"{name} {tuple(c)[1:]} gluon={stages} ERROR {str(e)[:120]}", flush=True)
                    continue
                same = torch.equal(y, ref)
                t = timings(lambda: lin.launch_grouped(x, w, offs, y, c))  # noqa: B023
                ms = t[1] or t[0]
                tf = 2 * R * N * K / ms / 1e9
                rows.append(dict(base, cfg=list(c), gluon_stages=stages, same=same, ms=ms, tflops=tf,
                                 x_dense=base["dense_ms"] / ms, x_grouped_mm=base["grouped_mm_ms"] / ms,
                                 x_roof=base["roof_ms"] / ms))
                print(f"{name:22} skew={skew:.0f} R={R:6} max={base['max_rows']:5} bm={c.block_m:3} bn={c.block_n:3} "
                      f"g={c.group_m} w={c.num_warps} s={c.num_stages} tma={int(c.tma)} gluon={stages or '-'} "
                      f"same={int(same)} "
                      f"us={1e3 * ms:8.1f} TF={tf:6.1f} x_dense={base['dense_ms'] / ms:5.2f} "
                      f"x_grouped_mm={base['grouped_mm_ms'] / ms:5.2f} x_roof={base['roof_ms'] / ms:5.2f}", flush=True)
            if gluon:
                set_gluon("op")
            pick = lin.grouped_tile(R, E, torch.bfloat16, N)
            # the op: its pick and the zero fill
            same = torch.equal(lin.grouped_linear(x, w, offs), ref)
            t = timings(lambda: lin.grouped_linear(x, w, offs))  # noqa: B023
            ms = t[1] or t[0]
            rows.append(dict(base, cfg=["op", *list(pick)[1:]], same=same, ms=ms,
                             tflops=2 * R * N * K / ms / 1e9, x_dense=base["dense_ms"] / ms,
                             x_grouped_mm=base["grouped_mm_ms"] / ms, x_roof=base["roof_ms"] / ms))
            print(f"{name:22} skew={skew:.0f} grouped_linear (tile {tuple(pick)[1:]}) "
                  f"same={int(same)} us={1e3 * ms:8.1f} x_dense={base['dense_ms'] / ms:5.2f} "
                  f"x_grouped_mm={base['grouped_mm_ms'] / ms:5.2f} x_roof={base['roof_ms'] / ms:5.2f} "
                  f"(roofline {1e3 * base['roof_ms']:.1f} us)", flush=True)


def compile_only() -> int:
    """Build the Gluon rows' kernels for sm_90 on the CPU (ptxas -v): registers, spills, shared
    memory, HGMMA count. Returns how many failed."""
    from gluon_dkdv import desc_sig, ptxas_report
    from miles_kernels._triton import gluon_grouped as GG

    sig = {"x_desc": desc_sig(GG.BLOCK_M // 2, GG.BLOCK_K), "off_ptr": "*i32", "y_ptr": "*bf16",
           **{n: "i32" for n in ("N", "K", "E", "n_tiles_m", "stride_yr")}}
    failed = 0
    for block_n, stages in sorted({(t.block_n, s) for t, s in GLUON_CFGS}):
        consts = {"E_PAD": 128, "GROUP_M": 2, "STAGES": stages, "NUM_PROGRAMS": 132, "LOAD_REGS": GG.LOAD_REGS,
                  "CONSUMER_REGS": GG.CONSUMER_REGS}
        try:
            r = ptxas_report(GG._grouped_ws_kernel, {**sig, "w_desc": desc_sig(block_n, GG.BLOCK_K)}, consts, 4, 168)
        except Exception as e:  # noqa: BLE001 - reported, the others still build
            print(f"BLOCK_N {block_n} stages {stages}: FAILED {type(e).__name__}: {str(e)[:500]}")
            failed += 1
            continue
        print(f"BLOCK_N {block_n:3} stages {stages}: regs {r['regs']}, "
              f"spills {r['spill_stores']} / {r['spill_loads']} B, "
              f"shared {r['shared']} B, HGMMA {r['hgmma']}, waits {r['waits']}")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--compile-only", action="store_true", help="build the Gluon kernels for sm_90 here, no GPU")
    ap.add_argument("--shapes", default="", help="comma list of shape-name prefixes (default: all)")
    ap.add_argument("--no-gluon", action="store_true", help="skip the Gluon rows (a Triton without Gluon for Hopper)")
    ap.add_argument("--picks", action="store_true",
                    help="Triton rows: only the tiles grouped_tile picks (and 128x256 at 4 stages), not the sweep's")
    a = ap.parse_args()
    if a.compile_only:
        raise SystemExit(compile_only())
    if not torch.cuda.is_available() or not a.out:
        raise SystemExit("tools/bench/grouped_sweep.py needs a CUDA GPU and --out (or --compile-only)")
    shapes = [s for s in SHAPES if not a.shapes or any(s[0].startswith(p) for p in a.shapes.split(","))]
    rows = []
    # --picks: the tiles grouped_tile may pick, and the wide TMA tile at 4 stages (3 shipped; 4 read 0.98-1.13x
    # faster on the H100's training shapes in the thirty-fifth run's sweep, one read each)
    cfgs = [REF, *(t._replace(max_m=0) for t in lin.GROUPED_TILES[torch.bfloat16]), T(0, 128, 256, 64, 2, 8, 4, True)] \
        if a.picks else CFGS
    peak = measure_peaks()
    print(f"peaks: {peak['tflops']:.0f} TFLOP/s (cuBLAS), {peak['hbm_gbps']:.0f} GB/s (copy)", flush=True)
    run(rows, shapes, cfgs, GLUON_CFGS, not a.no_gluon, peak)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), peak=peak, rows=rows), f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
