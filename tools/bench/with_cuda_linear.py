"""Run a bench script with the plain linears at M <= 64 (o, down: matmul.linear) by tma_linear_probe's CUDA
kernel: the end-to-end A/B of that kernel before it goes into miles_kernels. Each (N, K) gets the fastest
config that gave `linear`'s bits at M 64 in a tma_linear_probe output; other shapes, biases, the fused
linears (q|k|v, gate|up) and M > 64 stay on the Triton kernels.

    PYTHONPATH=src:kernels python tools/bench/with_cuda_linear.py tma.json -- tools/bench/engine.py --quick \\
        --only engine --out cuda.json
"""

import json
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def best_configs(rows: list[dict], m: int = 64) -> dict[tuple[int, int], tuple[int, ...]]:
    """(N, K) -> (wg, bn, c, s) of the fastest same-bits config at M == m that beats the Triton time."""
    out = {}
    for row in rows:
        if row["M"] != m or "triton_us" not in row:
            continue
        timed = [(v["us"], k) for k, v in row["cfgs"].items() if v.get("same") and "us" in v]
        if timed and min(timed)[0] < row["triton_us"]:
            name = min(timed)[1]  # wg1_n16_c4_s8
            out[row["N"], row["K"]] = tuple(int(p[1:] if p[0] != "w" else p[2:]) for p in name.split("_"))
    return out


def install(picks: dict[tuple[int, int], tuple[int, ...]]) -> None:
    from tma_linear_probe import TMALinear

    from miles_kernels._triton import matmul

    kernels = {cfg: TMALinear(*cfg) for cfg in set(picks.values())}
    triton_launch = matmul._launch_linear

    def launch(x, w, b, y, t):
        cfg = picks.get((w.shape[0], x.shape[1]))
        if (cfg is not None and b is None and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= 64
                and matmul._tma_ok(x, w) and y.is_contiguous()):
            kernels[cfg](x, w, y)
        else:
            triton_launch(x, w, b, y, t)

    matmul._launch_linear = launch


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") != 1 or len(argv) < 3:
        raise SystemExit("with_cuda_linear: usage: with_cuda_linear.py PROBE.json -- SCRIPT [ARGS ...]")
    path, script, *args = argv[0], *argv[2:]
    try:
        rows = json.load(open(path))["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"with_cuda_linear: {path}: not a tma_linear_probe output ({e})") from None
    picks = best_configs(rows)
    if not picks:
        raise SystemExit(f"with_cuda_linear: {path}: no M 64 shape where a same-bits CUDA config beat Triton")
    install(picks)
    print("with_cuda_linear: (N, K) -> (wg, bn, cluster, stages)", picks, flush=True)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
