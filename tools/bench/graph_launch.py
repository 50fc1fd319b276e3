"""Host cost of launching a CUDA graph, by kernel count: what a decode step's replay costs
the host before the GPU starts. (Under torch.profiler a launch costs far more: CUPTI traces
every node; time launches without it.)

For N kernels of each kind (torch's `add_`, and miles_kernels' Triton `rms_norm`) captured
in one graph: the host microseconds of `graph.replay()` (no sync inside the timing; the GPU
is idle at the call) and the GPU microseconds of the replay.

    python tools/bench/graph_launch.py --out graph_launch.json
"""

from __future__ import annotations

import argparse
import json
import time

import miles_kernels as mk
import torch


def measure(kind: str, n: int, reps: int = 50) -> dict:
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)

    def body():
        y = x
        for _ in range(n):
            y = y.add_(1.0) if kind == "torch" else mk.rms_norm(y, w, 1e-6)
        return y

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    host, gpu = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        t = time.perf_counter()
        g.replay()
        host.append(time.perf_counter() - t)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return dict(kind=kind, kernels=n, host_us=1e6 * med(host), gpu_us=med(gpu),
                host_us_per_kernel=1e6 * med(host) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="16,64,256,1024", help="comma-separated kernel counts")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/graph_launch.py needs a CUDA device")
    rows = [measure(kind, int(n)) for kind in ("torch", "triton") for n in a.kernels.split(",")]
    print(f"{'kind':>7} {'kernels':>8} {'host us':>9} {'gpu us':>9} {'host us/kernel':>15}")
    for r in rows:
        print(f"{r['kind']:>7} {r['kernels']:>8} {r['host_us']:>9.1f} {r['gpu_us']:>9.1f} {r['host_us_per_kernel']:>15.2f}")
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                       rows=rows), f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
