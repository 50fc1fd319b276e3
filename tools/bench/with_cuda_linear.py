"""Run a bench script with the plain linears at M <= 64 (o, down: matmul.linear) by tma_linear_probe's CUDA
kernel, and q|k|v (linears) and gate|up (swiglu) too where the probe ran with --fused: the end-to-end A/B of
that kernel before it goes into miles_kernels. Each shape gets the fastest config that gave miles_kernels'
bits at M 64 in a tma_linear_probe output, where it beat Triton; other shapes, biases and M > 64 stay on the
Triton kernels. `--pdl 1|2|3` launch the CUDA kernels with programmatic dependent launch (each loads its first
stages' weights before waiting for the kernel ahead of it; it lets the next kernel launch 1: at its start, 2: at
its exit, 3: once its loads are issued and its K walk done).

    PYTHONPATH=src:kernels python tools/bench/with_cuda_linear.py tma.json [--pdl 1] -- tools/bench/engine.py \\
        --quick --only engine --out cuda.json
"""

import json
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tma_linear_probe import TMALinear, parse_config  # noqa: E402


def best_configs(rows: list[dict], m: int = 64, op: str = "linear", beat: bool = True) -> dict[tuple, tuple[int, ...]]:
    """(N, K) -> (wg, bn, c, s, mt, wm) of the fastest same-bits config at M == m (that beats the Triton time where
    beat), for one op of the probe (linear; linears: N is the weights' N tuple; swiglu: N is (F, F))."""
    out = {}
    for row in rows:
        if row["M"] != m or "triton_us" not in row or row.get("op", "linear") != op:
            continue
        timed = [(v["us"], k) for k, v in row["cfgs"].items() if v.get("same") and "us" in v]
        if timed and (min(timed)[0] < row["triton_us"] or not beat):
            name = min(timed)[1]
            n = row["N"] if op == "linear" else tuple(row["N"])
            out[n, row["K"]] = parse_config(name)
    return out


def install(picks: dict[str, dict[tuple, tuple[int, ...]]], pdl: int = 0) -> None:
    """Route the picked shapes to the CUDA kernels: linear through matmul._launch_linear, q|k|v and gate|up
    through miles_kernels._triton's linears / swiglu (what ops calls), at M <= 64, bf16, no bias."""
    import miles_kernels._triton as tri
    from miles_kernels._triton import matmul

    kernels = {(cfg, op == "swiglu"): TMALinear(*cfg[:4], swiglu=op == "swiglu", mt=cfg[4], wm=cfg[5], pdl=pdl)
               for op, p in picks.items() for cfg in p.values()}

    def ours(x, op, key):
        cfg = picks.get(op, {}).get(key)
        ok = (cfg is not None and x.is_cuda and x.dtype == torch.bfloat16 and 0 < x.shape[0] <= 64
              and x.is_contiguous())
        return kernels[cfg, op == "swiglu"] if ok else None

    triton_launch, triton_linears, triton_swiglu = matmul._launch_linear, tri.linears, tri.swiglu

    def launch(x, w, b, y, t):
        kern = ours(x, "linear", (w.shape[0], x.shape[1])) if b is None and y.is_contiguous() else None
        if kern is not None and matmul._tma_ok(x, w):
            kern(x, w, y)
        else:
            triton_launch(x, w, b, y, t)

    def linears(x, ws, bs=None):
        kern = ours(x, "linears", (tuple(w.shape[0] for w in ws), x.shape[1])) if bs is None else None
        if kern is None or not all(w.is_contiguous() for w in ws):
            return triton_linears(x, ws, bs)
        ys = tuple(torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device) for w in ws)
        kern(x, ws, ys)
        return ys

    def swiglu(x, w_gate, w_up):
        kern = ours(x, "swiglu", ((w_gate.shape[0], w_up.shape[0]), x.shape[1]))
        if kern is None or not (w_gate.is_contiguous() and w_up.is_contiguous()):
            return triton_swiglu(x, w_gate, w_up)
        y = torch.empty(x.shape[0], w_gate.shape[0], dtype=x.dtype, device=x.device)
        kern(x, (w_gate, w_up), y)
        return y

    matmul._launch_linear, tri.linears, tri.swiglu = launch, linears, swiglu


def main() -> None:
    argv = sys.argv[1:]
    usage = "with_cuda_linear: usage: with_cuda_linear.py PROBE.json [--pdl 0|1|2|3] -- SCRIPT [ARGS]"
    if "--" not in argv or len(argv) < argv.index("--") + 2:
        raise SystemExit(usage)
    ours, (script, *args) = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    pdl = 0
    if len(ours) == 3 and ours[1] == "--pdl" and ours[2] in ("0", "1", "2", "3"):
        pdl = int(ours[2])
    elif len(ours) != 1:
        raise SystemExit(f"{usage} (got {' '.join(ours)!r} before --)")
    path = ours[0]
    try:
        rows = json.load(open(path))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"with_cuda_linear: {path}: not a tma_linear_probe output ({e})") from None
    picks = {op: p for op in ("linear", "linears", "swiglu") if (p := best_configs(rows, op=op))}
    if not picks:
        raise SystemExit(f"with_cuda_linear: {path}: no M 64 shape where a same-bits CUDA config beat Triton")
    install(picks, pdl)
    print(f"with_cuda_linear (pdl {pdl}): op: (N, K) -> (wg, bn, cluster, stages, mma.sync m16 tiles or 0, "
          "warps along M)", picks, flush=True)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
