"""Time the training attention's backward: ours (_triton/attention_bwd.py) vs flash's (FA2).

    python tools/bench/attn_bwd.py OUT.json                  # 0.6B and 8B heads at L = 1k, 4k, 16k
    python tools/bench/attn_bwd.py OUT.json --sweep          # also each candidate tile of both kernels
    python tools/bench/attn_bwd.py OUT.json --lens 4096 --models 8b
    python tools/bench/attn_bwd.py OUT.json --tma            # operands by pointers, by TMA, then the defaults

One causal sequence of L tokens, bf16, head_dim 128, GQA (0.6B: 16 query / 8 kv heads; 8B:
32 / 8). Ours starts from our forward's output and LSE (packed_attention), flash's backward
(torch.ops.aten._flash_attention_backward) from flash's forward; forwards are not timed.
Times are medians of CUDA graph replays: the kernels' time, not the host's. x_flash > 1: ours
is faster. TFLOP/s counts the causal backward as 2.5 x the forward's 4 * L^2 * D * H / 2.

--sweep: the dK/dV kernel's tile candidates (DKDV_SWEEP) with the dQ kernel at its table's
tile, then the dQ kernel's (DQ_SWEEP) with the dK/dV kernel at its table's; each checked
against flash's grads first (within bf16 rounding). The table's own pick is the "table" row.
"""

import argparse
import datetime
import json

import torch
import triton
from triton.testing import do_bench

from miles_kernels._triton import attention_bwd as B
from miles_kernels._triton.paged_attention import packed_attention

MODELS = {"0.6b": (16, 8), "8b": (32, 8)}  # query heads, kv heads
D = 128
DT = torch.bfloat16
DKDV_SWEEP = [B.Tile(*t) for t in (  # BLOCK_M (query rows per step), BLOCK_N (keys), warps, stages
    (64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3),
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3))]
DQ_SWEEP = [B.Tile(*t) for t in (
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
    (64, 32, 4, 3), (128, 128, 8, 2))]


def _graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median")


class Case:
    """One causal sequence of L tokens: inputs, our forward's (out, LSE), flash's forward state."""

    def __init__(self, H: int, K: int, L: int):
        g = torch.Generator(device="cuda").manual_seed(L + H)
        self.q, self.dout = (torch.randn(L, H, D, generator=g, device="cuda").to(DT) for _ in range(2))
        self.k, self.v = (torch.randn(L, K, D, generator=g, device="cuda").to(DT) for _ in range(2))
        self.cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        self.L, self.scale = L, D**-0.5
        self.lse = torch.empty(H, L, device="cuda")
        self.out = packed_attention(self.q, self.k, self.v, self.cu, L, self.scale, lse_HT=self.lse)
        self.flash_fwd = torch.ops.aten._flash_attention_forward(self.q, self.k, self.v, self.cu, self.cu, L, L, 0.0,
                                                                 True, False, scale=self.scale)[:4]
        self.tflop = 2.5 * 4 * L * L * D * H / 2 / 1e12

    def ours(self, dkdv_tile=None, dq_tile=None):
        return B.packed_attention_bwd(self.q, self.k, self.v, self.out, self.dout, self.lse, self.cu, self.L,
                                      self.scale, dkdv_tile=dkdv_tile, dq_tile=dq_tile)

    def flash(self):
        out, lse, rng, unused = self.flash_fwd
        return torch.ops.aten._flash_attention_backward(self.dout, self.q, self.k, self.v, out, lse, self.cu, self.cu,
                                                        self.L, self.L, 0.0, True, rng, unused, scale=self.scale)[:3]


def _bad(got, want) -> list[str]:
    """Grads further from flash's than bf16 rounding allows (2% of the largest element)."""
    return [name for name, a, b in zip(("dq", "dk", "dv"), got, want)
            if not (a.double() - b.double()).abs().max() <= 2e-2 * b.double().abs().max()]


def compare(cases: dict) -> list[dict]:
    rows = []
    print(f"{'model':>5} {'L':>6} {'ours us':>9} {'flash us':>9} {'x_flash':>8} {'ours TF/s':>9} {'flash TF/s':>10}")
    for (model, L), c in cases.items():
        bad = _bad(c.ours(), c.flash())
        ours, flash = _graph_ms(c.ours), _graph_ms(c.flash)
        rows.append(dict(model=model, L=L, us=ours * 1e3, flash_us=flash * 1e3, x_flash=flash / ours,
                         tflops=c.tflop / ours * 1e3, flash_tflops=c.tflop / flash * 1e3, bad=bad))
        print(f"{model:>5} {L:>6} {ours * 1e3:9.1f} {flash * 1e3:9.1f} {flash / ours:8.2f} {c.tflop / ours * 1e3:9.0f} "
              f"{c.tflop / flash * 1e3:10.0f}" + (f"  WRONG {bad}" if bad else ""), flush=True)
    return rows


def sweep(cases: dict, flash_us: dict) -> list[dict]:
    """Each candidate tile of one kernel, the other at its table's tile: total backward time
    (flash_us: flash's time per case, from compare)."""
    rows = []
    flash = {key: c.flash() for key, c in cases.items()}
    for kernel, tiles in (("dkdv", DKDV_SWEEP), ("dq", DQ_SWEEP)):
        for tile in [None, *tiles]:
            kw = {f"{kernel}_tile": tile}
            row = dict(kernel=kernel, tile=list(tile) if tile else "table", t={})
            try:
                for (model, L), c in cases.items():
                    bad = _bad(c.ours(**kw), flash[model, L])
                    ms = _graph_ms(lambda: c.ours(**kw))
                    row["t"][f"{model} L={L}"] = dict(us=ms * 1e3, x_flash=flash_us[model, L] / 1e3 / ms, bad=bad)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is a row too
                row["error"] = str(e)[:500]
            rows.append(row)
            print(f"{kernel:>4} {str(row['tile']):>20} " + (f"ERROR {row['error'][:120]}" if "error" in row else " ".join(
                f"{k}: {v['us']:.0f}us {v['x_flash']:.2f}x" + (f" WRONG {v['bad']}" if v["bad"] else "")
                for k, v in row["t"].items())), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file for the results")
    ap.add_argument("--sweep", action="store_true", help="also time each candidate tile of both kernels")
    ap.add_argument("--models", default="0.6b,8b", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--lens", default="1024,4096,16384", help="comma-separated sequence lengths")
    ap.add_argument("--tma", action="store_true",
                    help="first every operand by pointers, then by TMA (DKDV_TMA, DQ_TMA): grads bitwise equal?")
    args = ap.parse_args()
    cases = {(m, L): Case(*MODELS[m], L) for m in args.models.split(",") for L in map(int, args.lens.split(","))}
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.date.today().isoformat(), dkdv_tiles={str(k): v for k, v in B.DKDV_TILES.items()},
               dq_tiles={str(k): v for k, v in B.DQ_TILES.items()}, fill=B.FILL, dkdv_tma=B.DKDV_TMA,
               dq_tma=B.DQ_TMA)
    if args.tma:  # every operand by pointers, then dK/dV's and dQ's both by TMA; the defaults last
        saved = B.DKDV_TMA, B.DQ_TMA
        ref = {}
        for name, flags in (("pointers", (False, False)), ("tma", (True, True))):
            B.DKDV_TMA, B.DQ_TMA = flags
            print(f"DKDV_TMA, DQ_TMA = {flags}:")
            res[f"compare_{name}"] = compare(cases)
            grads = {key: c.ours() for key, c in cases.items()}
            ref = ref or grads
            res[f"same_{name}"] = {f"{m} L={L}": all(torch.equal(a, b) for a, b in zip(grads[m, L], ref[m, L]))
                                   for (m, L) in cases}
            print(f"  grads bitwise equal to the pointers' {res[f'same_{name}']}")
        B.DKDV_TMA, B.DQ_TMA = saved
        print(f"defaults DKDV_TMA, DQ_TMA = {saved}:")
    res["compare"] = compare(cases)
    json.dump(res, open(args.out, "w"), indent=1)
    if args.sweep:
        res["sweep"] = sweep(cases, {(r["model"], r["L"]): r["flash_us"] for r in res["compare"]})
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
