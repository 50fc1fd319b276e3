"""rms_norm's backward kernel at the trainer's 16k-token shapes (Qwen3-0.6B: the q / k norms over
[16384 x heads, 128] rows, the hidden norms over [16384, 1024] with the residual's grad added):
rows loaded ahead (elementwise_grads.AHEAD_ELEMENTS) against one row at a time, and fewer weight-grad
partials (_GW_PARTIAL: more rows a program), each variant checked against one row at a time at the
default partials first (gx bitwise; gw bitwise where the partition is the same, else to a bf16 rounding), then
the whole call CUDA-graph timed; the partial sum (torch's sum over [programs, D]) timed alone too.

    PYTHONPATH=src:kernels python tools/bench/norm_grad.py --out norm_grad.json
"""

import argparse
import json
import os
import sys
import time

import torch
import triton

from miles_kernels._triton import elementwise_grads as eg

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

SHAPES = {"q norm": (16384 * 16, 128, False), "k norm": (16384 * 8, 128, False), "hidden norm": (16384, 1024, True)}
AHEAD = (1, 256, 512, 1024, 4096)  # AHEAD_ELEMENTS: 1 = a row at a time (4096: 4 hidden rows)
PARTIALS = (1 << 20, 1 << 18, 1 << 16)  # _GW_PARTIAL: fp32 partial elements aimed at (the first: the default)
GW_TOL = 2.0**-7  # gw in bf16 summed over another partition: one rounding of bf16 (2^-8 relative) each way


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def run(out: str, device: str = "cuda") -> int:
    dev, g = torch.device(device), torch.Generator(device=device).manual_seed(0)
    rows, failed = [], 0
    saved = eg.AHEAD_ELEMENTS, eg._GW_PARTIAL
    try:
        for name, (M, D, add) in SHAPES.items():
            x = torch.randn(M, D, generator=g, device=dev).to(torch.bfloat16)
            w = (1 + 0.1 * torch.randn(D, generator=g, device=dev)).to(torch.bfloat16)
            gy = torch.randn(M, D, generator=g, device=dev).to(torch.bfloat16)
            a = torch.randn(M, D, generator=g, device=dev).to(torch.bfloat16) if add else None
            call = lambda: eg.rms_norm_grad(x, w, gy, 1e-6, True, True, a)  # noqa: E731
            nbytes = M * D * 2 * (4 if add else 3)  # x, g (, add) read, gx written
            eg.AHEAD_ELEMENTS, eg._GW_PARTIAL = 1, PARTIALS[0]
            want = call()
            for partial in PARTIALS:
                per = triton.cdiv(M, max(1, partial // D))  # rows a program (D a power of two here)
                part = torch.randn(triton.cdiv(M, per), D, generator=g, device=dev)
                _, sum_ms = timings(lambda: part.sum(0))
                for ahead in AHEAD:
                    eg.AHEAD_ELEMENTS, eg._GW_PARTIAL = ahead, partial
                    gx, gw = call()
                    same = torch.equal(_bits(gx), _bits(want[0])) and (
                        torch.equal(_bits(gw), _bits(want[1])) if partial == PARTIALS[0] else
                        bool(((gw.float() - want[1].float()).abs() <= GW_TOL * want[1].float().abs()).all()))
                    failed += not same
                    launched, graph = timings(call) if same else (None, None)
                    r = {"shape": name, "M": M, "D": D, "add": add, "ahead_elements": ahead, "gw_partial": partial,
                         "rows_a_program": per, "rows_ahead": max(1, min(per, ahead // D)), "checked": same,
                         "launched_ms": launched, "graph_ms": graph, "partial_sum_ms": sum_ms,
                         "tb_s": nbytes / (graph * 1e-3) / 1e12 if graph else None}
                    rows.append(r)
                    tb = f"{r['tb_s']:.2f}" if graph else "-"
                    gms = f"{graph * 1e3:9.1f}" if graph else f"{'-':>9}"
                    print(f"{name:>12} {M:>7} x {D:<5} {per:>4} rows a program, {r['rows_ahead']:>2} ahead  checked "
                          f"{same!s:>5}  graph {gms} us  {tb:>5} TB/s  (partial sum {sum_ms * 1e3:.1f} us)", flush=True)
    finally:
        eg.AHEAD_ELEMENTS, eg._GW_PARTIAL = saved
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "default_ahead_elements": saved[0], "default_gw_partial": saved[1]}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="norm_grad.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("norm_grad.py times CUDA kernels: run it on a GPU machine")
    sys.exit(run(a.out))


if __name__ == "__main__":
    main()
