"""The decode step's linears alone, layer after layer (q|k|v, o, gate|up with the SiLU, down; each op's input the
previous op's output), as miles_kernels' Triton kernels and as tma_linear_probe's CUDA kernels, the latter with
and without programmatic dependent launch (PDL). Why: at M 64 a linear's kernel is ~3 us over its K chain
(launch, prologue, the first loads' latency). Under PDL a CUDA kernel loads its first S stages of weights into
shared memory while the kernel before it still runs, and waits for it only before loading x. Each variant is one
CUDA graph of all layers, replayed by turns; the outputs are checked bit for bit against the Triton chain.

    PYTHONPATH=src:kernels python tools/bench/linear_chain_probe.py TMA.json --model qwen3-0.6b qwen3-8b \
        --out chain.json

TMA.json is a `tma_linear_probe.py --fused` output: each shape takes its fastest same-bits config at M (64).
Variants: triton; cuda (no PDL); cuda_pdl1 (each kernel lets the next launch at its start); cuda_pdl2 (the next
launches when this one exits: what a Triton kernel before ours gives without `gdc_launch_dependents`); cuda_pdl3
(the next launches once this one's last loads are issued and its K walks done).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from split_probe import graphed, time_rounds  # noqa: E402  (capture once; replays by turns, median us)
from tma_linear_probe import TMALinear  # noqa: E402
from with_cuda_linear import best_configs  # noqa: E402

VARIANTS = ("cuda", "cuda_pdl1", "cuda_pdl2", "cuda_pdl3")
# hidden, q (heads x 128), kv, intermediate, layers
MODELS = {"qwen3-0.6b": (1024, 2048, 1024, 3072, 28), "qwen3-8b": (4096, 4096, 1024, 12288, 36)}


def layer_weights(d: int, q: int, kv: int, f: int, g: torch.Generator) -> dict:
    def w(n, k, gain=1.0):
        return (torch.randn(n, k, generator=g, device="cuda") * gain * k**-0.5).to(torch.bfloat16)

    # down's gain keeps the activations near unit size through the layers (silu(g) u has variance ~0.35)
    return dict(qkv=(w(q, d), w(kv, d), w(kv, d)), o=w(d, q), gu=(w(f, d), w(f, d)), down=w(d, f, 1.7))


def triton_chain(mk, layers, h):
    outs = []
    for lw in layers:
        q, _, _ = mk.linears(h, lw["qkv"])
        a = mk.linear(q, lw["o"])
        g = mk.swiglu(a, *lw["gu"])
        h = mk.linear(g, lw["down"])
        outs.append(h)
    return outs


class CudaChain:
    """The same chain through TMALinear kernels (one per op, compiled with the given PDL mode), outputs allocated
    once."""

    def __init__(self, picks: dict, dims: tuple, m: int, pdl: int):
        d, q, kv, f, _ = dims
        cfg = {"qkv": picks["linears"][(q, kv, kv), d], "o": picks["linear"][d, q], "gu": picks["swiglu"][(f, f), d],
               "down": picks["linear"][d, f]}
        self.k = {op: TMALinear(*c[:4], swiglu=op == "gu", mt=c[4], wm=c[5], pdl=pdl) for op, c in cfg.items()}
        self.cfg = cfg
        new = lambda n: torch.empty(m, n, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        self.buf = dict(q=new(q), k=new(kv), v=new(kv), a=new(d), g=new(f))

    def __call__(self, layers, h, outs):
        b = self.buf
        for lw, out in zip(layers, outs):
            self.k["qkv"](h, lw["qkv"], (b["q"], b["k"], b["v"]))
            self.k["o"](b["q"], lw["o"], b["a"])
            self.k["gu"](b["a"], lw["gu"], b["g"])
            self.k["down"](b["g"], lw["down"], out)
            h = out
        return outs


def run_model(mk, name: str, picks: dict, m: int, rounds: int, n_layers: int | None, variants: list[str]) -> dict:
    dims = MODELS[name]
    d, q, kv, f, nl = dims
    nl = n_layers or nl
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = [layer_weights(d, q, kv, f, g) for _ in range(nl)]
    x = torch.randn(m, d, generator=g, device="cuda").to(torch.bfloat16)
    want = triton_chain(mk, layers, x)
    graphs, row, keep = {}, dict(model=name, M=m, layers=nl), []  # keep: what a graph's kernels read and write
    graphs["triton"], triton_outs = graphed(lambda: triton_chain(mk, layers, x))
    keep.append(triton_outs)
    for tag in variants:
        pdl = int(tag[-1]) if tag != "cuda" else 0
        try:
            chain = CudaChain(picks, dims, m, pdl)
            row["configs"] = {op: list(c) for op, c in chain.cfg.items()}
            outs = [torch.empty(m, d, device="cuda", dtype=torch.bfloat16) for _ in range(nl)]
            keep.append((chain, outs))
            chain(layers, x, outs)
            torch.cuda.synchronize()
            eager_same = all(torch.equal(o.view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, want))
            graphs[tag] = graphed(lambda chain=chain, outs=outs: chain(layers, x, outs))[0]
            for o in outs:
                o.fill_(float("nan"))
            graphs[tag].replay()
            torch.cuda.synchronize()
            graph_same = all(torch.equal(o.view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, want))
            row[tag] = dict(eager_same=eager_same, graph_same=graph_same)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result
            row[tag] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.synchronize()
            graphs.pop(tag, None)
    one = time_rounds({"triton": graphs["triton"]}, 1, 1)["triton"]
    reps = max(5, round(20e3 / max(one, 1.0)))  # ~20 ms a read
    row.setdefault("triton", {})
    for tag, us in time_rounds(graphs, reps, rounds).items():
        row[tag].update(us=us, us_per_layer=us / nl)
    base = row["triton"]["us"]
    msg = f"{name} M={m} {nl} layers: triton {base:.1f} us ({base / nl:.2f} a layer)"
    for tag in graphs:
        if tag != "triton":
            r = row[tag]
            msg += (f"; {tag} {r['us']:.1f} ({r['us'] / nl:.2f}, {base / r['us']:.3f}x triton, bits "
                    f"{'same' if r['eager_same'] and r['graph_same'] else 'DIFFER'})")
    for tag in variants:
        if "error" in row.get(tag, {}):
            msg += f"; {tag} failed: {row[tag]['error'][:160]}"
    print(msg, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", help="tma_linear_probe.py --fused output (JSON)")
    ap.add_argument("--model", nargs="+", default=["qwen3-0.6b"], choices=sorted(MODELS))
    ap.add_argument("--m", type=int, default=64, help="rows (the batch); configs from the probe's rows at this M")
    ap.add_argument("--layers", type=int, default=None, help="default: the model's")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="pick among the configs whose names contain this (e.g. _w4)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default="linear_chain_probe.json")
    a = ap.parse_args()
    try:
        rows = json.load(open(a.probe))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"linear_chain_probe: {a.probe}: not a tma_linear_probe output ({e})") from None
    if a.only:  # keep the configs whose names hold the string (e.g. _w4: mma.sync warps along M)
        rows = [dict(r, cfgs={k: v for k, v in r.get("cfgs", {}).items() if a.only in k}) for r in rows]
    picks = {op: best_configs(rows, m=a.m, op=op, beat=False) for op in ("linear", "linears", "swiglu")}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("linear_chain_probe: needs a CUDA GPU of compute capability 9.0 (Hopper: TMA, PDL)")
    import miles_kernels as mk

    out = []
    for name in a.model:
        d, q, kv, f, _ = MODELS[name]
        need = [("linears", ((q, kv, kv), d)), ("linear", (d, q)), ("swiglu", ((f, f), d)), ("linear", (d, f))]
        missing = [f"{op} {key}" for op, key in need if key not in picks[op]]
        if missing:
            raise SystemExit(f"linear_chain_probe: {a.probe} has no same-bits M {a.m} config for {name}: {missing} "
                             f"(run tma_linear_probe.py --fused --ms {a.m})")
        out.append(run_model(mk, name, picks, a.m, a.rounds, a.layers, a.variants))
        json.dump(dict(device=torch.cuda.get_device_name(), rows=out), open(a.out, "w"), indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
