"""Would a persistent decode layer pay? The four projections of a decode step at M = 64 rows
(q|k|v, o, gate|up, down, each fed the previous one's output) run as

    separate    one launch a projection (the same tile code), four kernels in a CUDA graph
    persistent  one launch: k programs an SM (--per-sm) walk each projection's column tiles,
                with a grid barrier (a global counter, release / acquire) between projections
    no_barrier  the same one launch without the barriers: racy, timing only; what the
                barriers themselves cost
    ours        miles_kernels' linear (the shipped small-M tiles), four launches in a graph
    cublas      torch.mm, four launches in a graph

each timed from CUDA graph replays with the weights cold (cycled through copies past L2, as
the decode step meets them), at the Qwen3-0.6B and 8B shapes. The persistent output must equal
the separate launches' bit for bit (same tiles, same K order). The issue's lever for the
small-batch decode step is fewer, longer kernels; if `persistent` is not clearly under
`separate`, the kernel boundaries are not where the step's time goes.

    PYTHONPATH=src:kernels python tools/bench/persistent_probe.py --out persistent.json
"""

import argparse
import json

import torch
import triton
import triton.language as tl

# (name, [(N, K) of q|k|v, o, gate|up, down]): o reads the first K columns of q|k|v's output
# (the attention output's width), down the first K of gate|up's (the MLP's inner width)
SHAPES = {"0.6b": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)],
          "8b": [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]}
BK = 64
SPIN_MAX = 1 << 24  # a barrier gives up after this many polls (a wrong result, never a hung GPU)


@triton.jit
def _gemm_phase(x_ptr, w_ptr, y_ptr, N, K, stride_x, stride_w, stride_y, pid, nprog, M: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """y[:, tiles] = x[:, :K] @ w[tiles, :K]^T for the column tiles pid, pid + nprog, ..."""
    rows = tl.arange(0, M)
    ks = tl.arange(0, BK)
    for t in range(pid, N // BN, nprog):
        cols = t * BN + tl.arange(0, BN)
        acc = tl.zeros((M, BN), tl.float32)
        for k in range(0, K, BK):
            x = tl.load(x_ptr + rows[:, None] * stride_x + (k + ks)[None, :], cache_modifier=".cg")
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + (k + ks)[None, :])
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _grid_barrier(count_ptr, target, SPIN: tl.constexpr):
    """Every program's stores before it are seen by every program's loads after it."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    n = 0
    while (seen < target) & (n < SPIN):
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        n += 1
    tl.debug_barrier()


@triton.jit
def _layer_kernel(x_ptr, w0, w1, w2, w3, y0, y1, y2, y3, count_ptr, N0, K0, N1, K1, N2, K2, N3, K3,
                  s_x, s_w0, s_w1, s_w2, s_w3, s_y0, s_y1, s_y2, s_y3, M: tl.constexpr, BN0: tl.constexpr,
                  BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BK: tl.constexpr, BARRIER: tl.constexpr,
                  SPIN: tl.constexpr):
    """The four projections in one launch; counter 0 counts barrier arrivals, counter 1 the
    programs done, whose last resets both for the next launch."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _gemm_phase(x_ptr, w0, y0, N0, K0, s_x, s_w0, s_y0, pid, nprog, M, BN0, BK)
    if BARRIER:
        _grid_barrier(count_ptr, nprog, SPIN)
    _gemm_phase(y0, w1, y1, N1, K1, s_y0, s_w1, s_y1, pid, nprog, M, BN1, BK)
    if BARRIER:
        _grid_barrier(count_ptr, 2 * nprog, SPIN)
    _gemm_phase(y1, w2, y2, N2, K2, s_y1, s_w2, s_y2, pid, nprog, M, BN2, BK)
    if BARRIER:
        _grid_barrier(count_ptr, 3 * nprog, SPIN)
    _gemm_phase(y2, w3, y3, N3, K3, s_y2, s_w3, s_y3, pid, nprog, M, BN3, BK)
    if BARRIER:  # every program has left every wait: the last one done resets the counters
        if tl.atomic_add(count_ptr + 1, 1, sem="acq_rel", scope="gpu") == nprog - 1:
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(count_ptr + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _phase_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_x, stride_w, stride_y, M: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    _gemm_phase(x_ptr, w_ptr, y_ptr, N, K, stride_x, stride_w, stride_y, tl.program_id(0), tl.num_programs(0),
                M, BN, BK)


def tiles_for(N: int) -> int:
    """A projection's column tile: 16 below N 2048 (64 tiles at N 1024), else 32."""
    return 16 if N < 2048 else 32


class Chain:
    """The four projections' weights (copies to cycle through), outputs and counters."""

    def __init__(self, shapes, M: int, device: str, copies: int = 1, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        self.shapes, self.M = shapes, M
        self.x = torch.randn(M, shapes[0][1], generator=g, device=device).to(dt)
        self.ws = [[(torch.randn(N, K, generator=g, device=device) / K**0.5).to(dt) for N, K in shapes]
                   for _ in range(copies)]
        self.ys = [torch.empty(M, N, device=device, dtype=dt) for N, _ in shapes]
        self.xin = [torch.randn(M, K, generator=g, device=device).to(dt) for _, K in shapes]
        self.count = torch.zeros(2, dtype=torch.int32, device=device)
        self.bns = [tiles_for(N) for N, _ in shapes]

    def inputs(self, i: int):
        """Projection i's input: x, then the first K columns of the previous output."""
        return self.x if i == 0 else self.ys[i - 1]

    def persistent(self, c: int, programs: int, barrier: bool = True, num_stages: int = 4) -> None:
        w, y, (n0, k0), (n1, k1), (n2, k2), (n3, k3) = self.ws[c], self.ys, *self.shapes
        _layer_kernel[(programs,)](self.x, *w, *y, self.count, n0, k0, n1, k1, n2, k2, n3, k3, self.x.stride(0),
                                   *(t.stride(0) for t in w), *(t.stride(0) for t in y), M=self.M, BN0=self.bns[0],
                                   BN1=self.bns[1], BN2=self.bns[2], BN3=self.bns[3], BK=BK, BARRIER=barrier,
                                   SPIN=SPIN_MAX, num_warps=4, num_stages=num_stages)

    def separate(self, c: int, num_stages: int = 4) -> None:
        for i, ((N, K), bn) in enumerate(zip(self.shapes, self.bns)):
            x, w, y = self.inputs(i), self.ws[c][i], self.ys[i]
            _phase_kernel[(N // bn,)](x, w, y, N, K, x.stride(0), w.stride(0), y.stride(0), M=self.M, BN=bn, BK=BK,
                                      num_warps=4, num_stages=num_stages)

    def linear(self, c: int, cublas: bool) -> None:
        """Each projection from a contiguous input of its own width (as the model feeds them)."""
        import miles_kernels as mk

        for i, x in enumerate(self.xin):
            if cublas:
                torch.mm(x, self.ws[c][i].t(), out=self.ys[i])
            else:
                mk.linear(x, self.ws[c][i])

    def reference(self, c: int) -> torch.Tensor:
        """The chain in float64 from the same inputs, rounded as each output is."""
        h = self.x.double()
        for i, (N, K) in enumerate(self.shapes):
            h = (h[:, :K] @ self.ws[c][i].double().t()).to(self.x.dtype).double()
        return h


def _graph_us(run, copies: int, reps: int = 200) -> float:
    """us a replay of a graph of `run(c)` for each weight copy c (weights cold), per copy."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in range(copies):
            run(c)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(copies):
            run(c)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / copies


def run(models: list[str], M: int, per_sm: list[int]) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name in models:
        shapes = SHAPES[name]
        wbytes = sum(N * K * 2 for N, K in shapes)
        copies = max(2, -(-(256 << 20) // wbytes))  # > 256 MB of weights cycled: none left in L2
        ch = Chain(shapes, M, "cuda", copies)
        ch.separate(0)
        want = ch.ys[3].clone()
        same = True
        for k in per_sm:
            ch.ys[3].zero_()
            ch.persistent(0, k * sms)
            same &= bool(torch.equal(ch.ys[3], want)) and ch.count.tolist() == [0, 0]
        err = (want.double() - ch.reference(0)).abs().max().item()
        t = {"separate": _graph_us(ch.separate, copies)}
        for k in per_sm:  # k programs an SM (every one resident: 48 KB of shared memory, 56 registers a thread)
            t[f"persistent_x{k}"] = _graph_us(lambda c: ch.persistent(c, k * sms), copies)
            t[f"no_barrier_x{k}"] = _graph_us(lambda c: ch.persistent(c, k * sms, barrier=False), copies)
        t["ours"] = _graph_us(lambda c: ch.linear(c, False), copies)
        t["cublas"] = _graph_us(lambda c: ch.linear(c, True), copies)
        row = dict(model=name, M=M, programs=sms, weight_mb=wbytes / 2**20, same_bits=same, max_err_vs_fp64=err,
                   us=t, gbps={k: wbytes / v / 1e3 for k, v in t.items()})  # weight bytes / time
        rows.append(row)
        print(f"{name} M {M}: " + "  ".join(f"{k} {v:7.1f} us ({row['gbps'][k]:5.0f} GB/s)" for k, v in t.items())
              + f"  | persistent == separate bitwise: {same}, max err vs fp64 {err:.3g}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, default=64, choices=(64,), help="M (the probe's tiles are 64 rows)")
    ap.add_argument("--per-sm", type=int, nargs="+", default=[1, 2], choices=(1, 2, 3),
                    help="programs an SM of the persistent launch (all must be resident at once)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/persistent_probe.py needs a CUDA device (it times Triton kernels)")
    rows = run(a.models, a.rows, a.per_sm)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=rows), f, indent=1)
    if not all(r["same_bits"] for r in rows):
        raise SystemExit(f"the persistent launch differs from the separate ones (see {a.out}): a barrier let a "
                         "projection read its input early")


if __name__ == "__main__":
    main()
