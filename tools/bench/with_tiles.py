"""Run a bench script with the small-M linear tiles changed: an end-to-end A/B of a tile choice
(the engine's decode step, the RL step) before it goes into miles_kernels' tables.

    PYTHONPATH=src:kernels python tools/bench/with_tiles.py --unroll 64x32=2:6 64x16=2:8 -- \\
        tools/bench/engine.py --quick --only engine --out unrolled.json

    ... with_tiles.py --fill 0.75 -- tools/bench/engine.py --quick --only engine    # another FILL
    ... with_tiles.py --fill-max-m 512 -- tools/bench/engine.py --quick   # the M bucket's tile above M 512
    ... with_tiles.py --tma-stages 128x128=4 128x64=4 -- tools/bench/engine.py --quick   # 4 stages
    ... with_tiles.py --small-table 128x128:tma:8:5 64x128:tma:4:8 64x64:tma:4:6 64x32:ptr:4:6:2 \
        64x16:ptr:4:8:2 -- tools/bench/step_peer.py   # a whole small-M table, widest first
    ... with_tiles.py --small-tma off -- tools/bench/engine.py --quick   # linears / swiglu by pointers
    ... with_tiles.py --gluon-paged off -- tools/bench/engine.py --quick   # the prefill by the Triton kernel
    ... with_tiles.py --fast-pick off -- tools/bench/train.py --modes fast   # fast mode's linears by cuBLAS only
    ... with_tiles.py --sampler-screen off -- tools/bench/engine.py --quick   # every token's exact logs
    ... with_tiles.py --topk-cut on -- tools/bench/filter.py --cut-only   # top-k's value by the cut's search
    ... with_tiles.py --cut-asm off -- tools/bench/filter.py --cut-only   # the cut's lane loops by Triton's ops
    ... with_tiles.py --pdl on -- tools/bench/step_peer.py --shapes 64x256   # the decode kernels with PDL
    ... with_tiles.py --pdl-tma on -- tools/bench/step_peer.py --shapes 256x256   # the TMA linears too
    ... with_tiles.py --linears-tma-store on -- tools/bench/step_peer.py --shapes 256x256   # q|k|v stored by TMA
    ... with_tiles.py --stream-k on -- tools/bench/engine.py --quick   # stream-K in linear and swiglu

Each BMxBN=U:S sets the 16-bit SMALL_M_TILES pointer tile BLOCK_M x BLOCK_N to U BLOCK_K steps
a loop iteration (Tile.k_unroll) and S pipeline stages. The dots and their order stay as they are,
so the bits do too (tests/gpu/test_matmul_gpu.py::test_unrolled_small_m_tiles_same_bits).
Each BMxBN=S of --tma-stages sets the small-M TMA tile BLOCK_M x BLOCK_N to S stages (also what
linears and swiglu run it with). --small-table replaces
the whole small-M table (linear_tile's fill rule takes the first tile, in the order given, whose grid fills
matmul.FILL of the SMs): each BMxBN:tma:W:S or BMxBN:ptr:W:S[:U] one tile, W warps, S stages, U BLOCK_K steps an
iteration (pointer tiles), BLOCK_K 64 as every table tile (so the bits stay). --small-tma on / off
runs those tiles in linears and swiglu by TMA / by pointers (fused_linears.SMALL_M_TMA); --gluon-paged sets
paged_attention.GLUON_PAGED (the paged prefill by the Gluon kernel). Each gives the same bits either way.
--fast-pick sets _fast_pick.PICK (fast mode's linears by the faster of cuBLAS and the invariant kernel, timed
per shape; off: cuBLAS).
--sampler-screen sets engine.sampler.SCREEN (the noisy argmax ranked by fast logs first; same tokens).
--topk-cut sets rows.TOPK_BY_CUT (top-k's k-th value by cut.top_k_floor in place of torch.topk; same values).
--cut-asm sets cut.ASM (the cut's lane loops in PTX; same bits).
--decode-pairs sets paged_attention.DECODE_PAIRS to 2 / 1 (two (sequence, kv head) pairs a decode program; same bits).
--pdl sets launch.PDL (the kernels with USE_GDC launched with programmatic dependent launch, late triggers; gdc.py).
--pdl-tma sets launch.PDL_TMA (the persistent TMA linears with PDL too, while --pdl is on; same bits).
--linears-tma-store sets fused_linears.TMA_STORE (linears' TMA kernel stores its tiles by TMA; same bits).
--stream-k sets streamk.STREAM_K (stream-K in linear's and swiglu's persistent TMA grids; same bits).
--fill F sets matmul.FILL, the share of the SMs a small-M tile's grid must fill before a wider
tile is taken (every tile gives the same bits); --fill-max-m M sets matmul.FILL_MAX_M, the largest
M whose tile the fill rule picks (above, the M bucket's). The script runs in this process (runpy), so
its own subprocesses would not see the change. `changes(options)` makes the same changes in the calling process
and returns a function that undoes them (step_peer.py --variants: an A/B of several changes in one process).
"""

import argparse
import runpy
import sys
from collections.abc import Callable

import torch


def parse(specs: list[str]) -> dict[tuple[int, int], tuple[int, int]]:
    out = {}
    for spec in specs:
        try:
            shape, rest = spec.split("=")
            bm, bn = (int(v) for v in shape.lower().split("x"))
            unroll, stages = (int(v) for v in rest.split(":"))
        except ValueError:
            raise SystemExit(f"with_tiles: --unroll {spec!r}: write BMxBN=U:S, e.g. 64x32=2:6") from None
        if unroll < 1 or stages < 1:
            raise SystemExit(f"with_tiles: --unroll {spec!r}: U and S must be >= 1")
        out[bm, bn] = unroll, stages
    return out


def parse_stages(specs: list[str]) -> dict[tuple[int, int], int]:
    out = {}
    for spec in specs:
        try:
            shape, stages = spec.split("=")
            bm, bn = (int(v) for v in shape.lower().split("x"))
            out[bm, bn] = int(stages)
        except ValueError:
            raise SystemExit(f"with_tiles: --tma-stages {spec!r}: write BMxBN=S, e.g. 128x128=5") from None
        if out[bm, bn] < 1:
            raise SystemExit(f"with_tiles: --tma-stages {spec!r}: S must be >= 1")
    return out


def parse_table(specs: list[str]) -> tuple:
    from miles_kernels._triton import matmul

    out = []
    for spec in specs:
        try:
            shape, kind, *nums = spec.split(":")
            bm, bn = (int(v) for v in shape.lower().split("x"))
            warps, stages, *unroll = (int(v) for v in nums)
            if kind not in ("tma", "ptr") or len(unroll) > (kind == "ptr"):
                raise ValueError
        except ValueError:
            raise SystemExit(f"with_tiles: --small-table {spec!r}: write BMxBN:tma:W:S or BMxBN:ptr:W:S[:U], "
                             "e.g. 64x128:tma:4:8 or 64x32:ptr:4:6:2") from None
        if bm not in (64, 128) or bn < 16 or bn & (bn - 1) or min(warps, stages, *unroll) < 1:
            raise SystemExit(f"with_tiles: --small-table {spec!r}: BM 64 or 128, BN a power of two >= 16, "
                             "W, S, U >= 1")
        out.append(matmul.Tile(matmul.SMALL_M, bm, bn, 64, 8 if kind == "tma" else 1, warps, stages, kind == "tma",
                               unroll[0] if unroll else 1))
    return tuple(out)


_KEPT: list[tuple] = []  # every table installed, alive: matmul's pick cache keys a table by id()


def install(tiles: tuple) -> tuple:
    """tiles as the 16-bit SMALL_M_TILES."""
    from miles_kernels._triton import matmul

    _KEPT.append(tiles)
    for dtype in (torch.bfloat16, torch.float16):
        matmul.SMALL_M_TILES[dtype] = tiles
    return tiles


def apply(changes: dict[tuple[int, int], tuple[int, int]], tma_stages: dict[tuple[int, int], int] | None = None
          ) -> tuple:
    from miles_kernels._triton import matmul

    tma_stages = tma_stages or {}
    old = matmul.SMALL_M_TILES[torch.bfloat16]
    for kind, asked, tma in (("pointer", changes, False), ("TMA", tma_stages, True)):
        have = {(t.block_m, t.block_n) for t in old if t.tma == tma}
        missing = sorted(set(asked) - have)
        if missing:
            raise SystemExit(f"with_tiles: no small-M {kind} tile {missing}; the table has {sorted(have)}")
    return install(tuple(
        t._replace(k_unroll=changes[t.block_m, t.block_n][0], num_stages=changes[t.block_m, t.block_n][1])
        if not t.tma and (t.block_m, t.block_n) in changes else
        t._replace(num_stages=tma_stages[t.block_m, t.block_n])
        if t.tma and (t.block_m, t.block_n) in tma_stages else t for t in old))


SWITCHES = {"small_tma": ("miles_kernels._triton.fused_linears", "SMALL_M_TMA"),  # --NAME on|off: a module's flag
            "gluon_paged": ("miles_kernels._triton.paged_attention", "GLUON_PAGED"),
            "fast_pick": ("miles_kernels._fast_pick", "PICK"),
            "sampler_screen": ("miles_fsdp.engine.sampler", "SCREEN"),
            "topk_cut": ("miles_kernels._triton.rows", "TOPK_BY_CUT"),
            "cut_asm": ("miles_kernels._triton.cut", "ASM"),
            "decode_pairs": ("miles_kernels._triton.paged_attention", "DECODE_PAIRS"),
            "pdl": ("miles_kernels._triton.launch", "PDL"),
            "pdl_tma": ("miles_kernels._triton.launch", "PDL_TMA"),
            "linears_tma_store": ("miles_kernels._triton.fused_linears", "TMA_STORE"),
            "stream_k": ("miles_kernels._triton.streamk", "STREAM_K")}
VALUES = {"DECODE_PAIRS": (2, 1)}  # a flag whose on / off are not True / False
USAGE = ("[--unroll BMxBN=U:S ...] [--tma-stages BMxBN=S ...] [--small-table BMxBN:KIND:W:S[:U] ...] [--fill F] "
         "[--fill-max-m M] [--" + "|--".join(n.replace("_", "-") for n in SWITCHES) + " on|off]")


def changes(argv: list[str], who: str = "with_tiles") -> tuple[Callable[[], None], str]:
    """Make the changes argv asks for (the options above) in this process: (a function that undoes them, what
    changed in words). Refused with a message naming the option where argv is malformed or changes nothing."""
    ap = argparse.ArgumentParser(prog=who, description=__doc__.split("\n\n")[0])
    ap.add_argument("--unroll", nargs="+", default=[], metavar="BMxBN=U:S")
    ap.add_argument("--tma-stages", nargs="+", default=[], metavar="BMxBN=S")
    ap.add_argument("--small-table", nargs="+", default=[], metavar="BMxBN:KIND:W:S[:U]")
    ap.add_argument("--fill", type=float, default=None, metavar="F")
    ap.add_argument("--fill-max-m", type=int, default=None, metavar="M")
    for name in SWITCHES:
        ap.add_argument("--" + name.replace("_", "-"), choices=("on", "off"), default=None)
    a = ap.parse_args(argv)
    flags = {SWITCHES[n]: getattr(a, n) == "on" for n in SWITCHES if getattr(a, n) is not None}
    if a.small_table and (a.unroll or a.tma_stages):
        raise SystemExit(f"{who}: --small-table gives the whole table; --unroll and --tma-stages change the "
                         "shipped one: give one or the other")
    tables = a.unroll or a.tma_stages or a.small_table
    if not tables and a.fill is None and a.fill_max_m is None and not flags:
        raise SystemExit(f"{who}: {' '.join(argv)!r}: nothing to change; give one of {USAGE}")
    if a.fill_max_m is not None and a.fill_max_m < 1:
        raise SystemExit(f"{who}: --fill-max-m {a.fill_max_m}: must be >= 1 (rows)")
    if a.fill is not None and not 0.0 < a.fill <= 4.0:
        raise SystemExit(f"{who}: --fill {a.fill}: must be in (0, 4] (a share of the SMs)")
    import importlib

    from miles_kernels._triton import matmul

    saved_tiles, saved_fill = dict(matmul.SMALL_M_TILES), (matmul.FILL, matmul.FILL_MAX_M)
    modules = {key: importlib.import_module(key[0]) for key in flags}
    saved_flags = {key: getattr(modules[key], key[1]) for key in flags}
    tiles = install(parse_table(a.small_table)) if a.small_table else apply(parse(a.unroll), parse_stages(a.tma_stages))
    for (module, flag), on in flags.items():
        setattr(modules[module, flag], flag, VALUES.get(flag, (True, False))[0 if on else 1])
    if a.fill is not None:
        matmul.FILL = a.fill
    if a.fill_max_m is not None:
        matmul.FILL_MAX_M = a.fill_max_m

    def undo() -> None:
        matmul.SMALL_M_TILES.clear()
        matmul.SMALL_M_TILES.update(saved_tiles)
        matmul.FILL, matmul.FILL_MAX_M = saved_fill
        for key, value in saved_flags.items():
            setattr(modules[key], key[1], value)

    said = " ".join([f"small-M tiles {[tuple(t) for t in tiles]} FILL {matmul.FILL} FILL_MAX_M {matmul.FILL_MAX_M}",
                     *(f"{flag} {on}" for (_, flag), on in flags.items())])
    return undo, said


def main() -> None:
    argv = sys.argv[1:]
    usage = f"with_tiles: usage: with_tiles.py {USAGE} -- SCRIPT [ARGS ...]"
    if "--" not in argv:
        raise SystemExit(usage)
    cut = argv.index("--")
    script, *args = argv[cut + 1:] or [""]
    _, said = changes(argv[:cut])
    if not script:
        raise SystemExit("with_tiles: no script after --")
    print("with_tiles:", said, flush=True)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
