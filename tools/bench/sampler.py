"""The engine's sampling step at the real vocabulary: our Gumbel argmax, screened by fast logs
(sampler.SCREEN, the default; also at ALT_CHUNK tokens a program) and with the exact logs of every
token, against two torch peers in the same run: the same draw in torch ops,
(filter(logits / T) + gumbel_noise).argmax(-1), and transformers' draw,
torch.multinomial(softmax(filter(logits / T))). Each row checks first that ours pick the torch ops'
tokens; then launched and CUDA-graph-replayed times.

    PYTHONPATH=src:kernels python tools/bench/sampler.py --out sampler.json
"""

import argparse
import json
import os
import sys

import torch

import miles_kernels as mk
from miles_fsdp.engine import sampler

sys.path.insert(0, os.path.dirname(__file__))
from kernel_ops import timings  # noqa: E402  (launched ms, CUDA-graph replay ms)

FILTERS = ((0, 1.0), (50, 1.0), (0, 0.95))  # (top_k, top_p)
ALT_CHUNK = 2048  # the screened kernel also at this many tokens a program (63 registers a thread, not 112)


def _ours(logits, temp, top_k, top_p, keys):
    """sample_launch's draw: the filter (if any) in torch, then our two-launch argmax."""
    if top_k or top_p < 1.0:
        return sampler.gumbel_argmax(mk.filter_logits(logits.float() / temp, top_k, top_p), 1.0, *keys)
    return sampler.gumbel_argmax(logits, temp, *keys)


def _torch_ops(logits, temp, top_k, top_p, keys):
    x = mk.filter_logits(logits.float() / temp, top_k, top_p)
    return (x + sampler.gumbel_noise(*keys, logits.shape[1])).argmax(-1)


def _multinomial(logits, temp, top_k, top_p, keys):
    probs = torch.softmax(mk.filter_logits(logits.float() / temp, top_k, top_p), -1)
    return torch.multinomial(probs, 1)[:, 0]


def _timed(fn) -> tuple[float, float | None]:
    launched, replayed = timings(fn)
    return launched * 1e3, None if replayed is None else replayed * 1e3


def run(rows: list[int], vocab: int, temps: list[float]) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for B in rows:
        logits = (torch.randn(B, vocab, generator=g, device="cuda") * 4).to(torch.bfloat16)
        keys = (torch.randint(0, 2**32, (B,), generator=g, device="cuda"), torch.arange(B, device="cuda"),
                torch.randint(0, 40000, (B,), generator=g, device="cuda"))
        for temp in temps:
            for top_k, top_p in FILTERS:
                args = (logits, temp, top_k, top_p, keys)
                want = _torch_ops(*args)
                row = dict(rows=B, vocab=vocab, temp=temp, top_k=top_k, top_p=top_p)
                shipped = sampler._ARGMAX_CHUNK
                for name, screen, chunk in (("screened", True, shipped), ("exact_logs", False, shipped),
                                            (f"screened_{ALT_CHUNK}", True, ALT_CHUNK)):
                    sampler.SCREEN, sampler._ARGMAX_CHUNK = screen, chunk
                    row[f"{name}_same"] = bool(torch.equal(_ours(*args), want))
                    row[f"{name}_us"], row[f"{name}_graph_us"] = _timed(lambda: _ours(*args))
                sampler.SCREEN, sampler._ARGMAX_CHUNK = True, shipped
                row["torch_ops_us"], row["torch_ops_graph_us"] = _timed(lambda: _torch_ops(*args))
                row["multinomial_us"], row["multinomial_graph_us"] = _timed(lambda: _multinomial(*args))
                out.append(row)
                print(_line(row), flush=True)
    return out


def _line(r: dict) -> str:
    def us(key):
        v = r.get(f"{key}_graph_us") or r[f"{key}_us"]
        return f"{v:8.1f}"

    base = r.get("screened_graph_us") or r["screened_us"]
    ratio = (r.get("multinomial_graph_us") or r["multinomial_us"]) / base
    return (f"B {r['rows']:4d} T {r['temp']:.1f} top_k {r['top_k']:3d} top_p {r['top_p']:.2f} | "
            f"screened {us('screened')} exact logs {us('exact_logs')} torch ops {us('torch_ops')} "
            f"multinomial {us('multinomial')} us | multinomial / screened {ratio:5.2f}x | "
            f"screened at {ALT_CHUNK} {us(f'screened_{ALT_CHUNK}')} | "
            f"same {r['screened_same']} {r['exact_logs_same']} {r[f'screened_{ALT_CHUNK}_same']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--temps", type=float, nargs="+", default=[1.0, 0.7])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/sampler.py needs a CUDA device (the sampler's kernels are Triton on CUDA)")
    if any(t <= 0 for t in a.temps):
        raise SystemExit("--temps: temperatures > 0 (temperature 0 is greedy argmax, no noise to time)")
    print("times in us: CUDA-graph replay where it captured, else launched")
    res = run(a.rows, a.vocab, a.temps)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=res), f, indent=1)
    bad = [r for r in res if not all(v for k, v in r.items() if k.endswith("_same"))]
    if bad:
        raise SystemExit(f"{len(bad)} rows where our draw is not the torch ops' (see {a.out})")


if __name__ == "__main__":
    main()
