"""Run a bench script with the small-M linear tiles changed: an end-to-end A/B of a tile choice
(the engine's decode step, the RL step) before it goes into miles_kernels' tables.

    PYTHONPATH=src:kernels python tools/bench/with_tiles.py --unroll 64x32=2:6 64x16=2:8 -- \\
        tools/bench/engine.py --quick --only engine --out unrolled.json

Each BMxBN=U:S sets the 16-bit SMALL_M_TILES pointer tile BLOCK_M x BLOCK_N to U BLOCK_K steps
a loop iteration (Tile.k_unroll) and S pipeline stages. The dots and their order stay as they are,
so the bits do too (tests/gpu/test_kernels_gpu.py::test_unrolled_small_m_tiles_same_bits). The
script runs in this process (runpy), so its own subprocesses would not see the change.
"""

import argparse
import runpy
import sys

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


def apply(changes: dict[tuple[int, int], tuple[int, int]]) -> tuple:
    from miles_kernels._triton import matmul

    old = matmul.SMALL_M_TILES[torch.bfloat16]
    have = {(t.block_m, t.block_n) for t in old if not t.tma}
    missing = sorted(set(changes) - have)
    if missing:
        raise SystemExit(f"with_tiles: no small-M pointer tile {missing}; the table has {sorted(have)}")
    new = tuple(t._replace(k_unroll=changes[t.block_m, t.block_n][0], num_stages=changes[t.block_m, t.block_n][1])
                if not t.tma and (t.block_m, t.block_n) in changes else t for t in old)
    for dtype in (torch.bfloat16, torch.float16):
        matmul.SMALL_M_TILES[dtype] = new
    return new


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("with_tiles: usage: with_tiles.py --unroll BMxBN=U:S ... -- SCRIPT [ARGS ...]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unroll", nargs="+", required=True, metavar="BMxBN=U:S")
    a = ap.parse_args(argv[:cut])
    script, *args = argv[cut + 1:] or [""]
    if not script:
        raise SystemExit("with_tiles: no script after --")
    tiles = apply(parse(a.unroll))
    print("with_tiles: small-M tiles", [tuple(t) for t in tiles], flush=True)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
