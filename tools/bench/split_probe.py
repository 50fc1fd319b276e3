"""Would the decode step gain from running its batch as parts on parallel streams? The small-batch
step is a chain of ~240 short kernels, most latency-bound (the M 64 linears stream their weights at
a quarter of HBM's rate; attention's launches carry a fixed ~10 us). Two halves of the batch on two
streams let one half's linears run beside the other's attention; every kernel is row-invariant, so
the logits keep their bits. This probe captures, on random Qwen3-shaped weights and a paged KV cache
filled to `ctx` tokens a sequence:

    whole       the engine's decode graph today: forward on all B rows, then the logits
    parts_N     the trunk (embedding .. final norm) on N row parts, part i on stream i, the streams
                joined, the hidden states concatenated, the logits on all B rows (the lm_head's
                weight read once)
    lock_N      parts_N with the streams held in step a layer at a time: part i's layer L waits for
                part i - 1's, part 0's layer L for the last part's layer L - 2 (so part 0's layer
                L + 1 runs beside part 1's layer L, which reads the weights part 0 just brought
                into L2)
    serial_N    the same parts one after another on one stream (what the parts cost unhidden)

times each as a CUDA graph replay (median of rounds taken in turn) and checks that every variant's
logits equal `whole`'s bit for bit. Each graph captures into a memory pool of its own: captures with side
streams sharing one pool faulted (illegal address) and timed impossibly fast. Measured on an H100 (forty-third
run, docs/kernel_tuning.md): parts_2 0.85-1.01x whole, lock_2 0.79-0.99x.

    PYTHONPATH=src:kernels python tools/bench/split_probe.py --out split.json
    ... --model qwen3-8b --batch 64 --ctx 256
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import miles_kernels as mk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import SHAPES, build  # noqa: E402

from miles_fsdp.graph_capture import capture_graph  # noqa: E402


def parse_shapes(tool: str, shapes: list[str]) -> list[tuple[int, int]]:
    """A decode probe's --shapes (BxCTX) as (batch, context) pairs; a malformed or non-positive one refused,
    the tool named."""
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in shapes]
    except ValueError:
        out = []
    if len(out) != len(shapes) or any(len(s) != 2 for s in out):
        raise SystemExit(f"{tool}: --shapes {shapes}: write BxCTX, e.g. 64x256")
    if any(min(s) < 1 for s in out):
        raise SystemExit(f"{tool}: --shapes {shapes}: batch and context must be positive (BxCTX, e.g. 64x256)")
    return out


def check_models(tool: str, models: list[str]) -> None:
    """Refuse a --model that engine.SHAPES does not know, naming the tool and the choices."""
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"{tool}: --model {unknown}: choose from {sorted(SHAPES)}")


def decode_inputs(model, batch: int, ctx: int, page: int, seed: int = 0):
    """ids, pos, slot, kv_lens, table, caches: every sequence holds ctx tokens and decodes one more
    (its K/V written at position ctx); pages handed out in a shuffled order, page 0 left as scratch."""
    a, dev = model.args, "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    per_seq = (ctx + 1 + page - 1) // page
    num_pages = 1 + batch * per_seq
    caches = []
    for _ in range(a.n_layers):
        k = torch.randn(num_pages, page, a.n_kv_heads, a.head_dim, generator=g, device=dev).to(torch.bfloat16)
        caches.append((k, torch.randn_like(k)))
    table = (1 + torch.randperm(batch * per_seq, generator=g, device=dev)).view(batch, per_seq).to(torch.int32)
    pos = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
    slot = table[:, ctx // page].to(torch.int64) * page + ctx % page
    ids = torch.randint(0, a.vocab_size, (batch,), generator=g, device=dev)
    kv_lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device=dev)
    return ids, pos, slot, kv_lens, table, caches


def trunk_layers(model, ids, pos, meta, slot, caches):
    """Transformer.forward a layer at a time: yields after each layer, returns the hidden states."""
    h_TD, delta_TD = model.embed(ids), None
    cos_TF, sin_TF = model._rope_cos_sin(pos)
    for layer, (k_cache, v_cache) in zip(model.layers, caches):
        h_TD, delta_TD = layer(h_TD, delta_TD, cos_TF, sin_TF, meta, slot, k_cache, v_cache)
        yield
    return model.norm.add_forward(delta_TD, h_TD)[1]


def make_forwards(model, ids, pos, slot, kv_lens, table, caches, parts: int) -> dict:
    """{variant: a function returning the [B, V] logits} for whole, parts_N, lock_N, serial_N."""
    B = ids.shape[0]
    cu = torch.arange(B + 1, dtype=torch.int32, device=ids.device)
    edges = [B * i // parts for i in range(parts + 1)]
    cuts = [slice(edges[i], edges[i + 1]) for i in range(parts)]
    metas = [mk.AttnMeta(cu[: s.stop - s.start + 1], kv_lens[s], table[s], max_q_len=1) for s in cuts]
    streams = [torch.cuda.Stream() for _ in cuts]

    def whole():
        meta = mk.AttnMeta(cu, kv_lens, table, max_q_len=1)
        return model.logits(model.forward(ids, pos, meta, slot, caches))

    def trunk(s, meta):
        return model.forward(ids[s], pos[s], meta, slot[s], caches)

    def on_streams():
        main = torch.cuda.current_stream()
        hs = []
        for s, meta, st in zip(cuts, metas, streams):
            st.wait_stream(main)
            with torch.cuda.stream(st):
                hs.append(trunk(s, meta))
        for st in streams:
            main.wait_stream(st)
        return model.logits(torch.cat(hs))

    def locked():
        main = torch.cuda.current_stream()
        gens = [trunk_layers(model, ids[s], pos[s], meta, slot[s], caches) for s, meta in zip(cuts, metas)]
        for st in streams:
            st.wait_stream(main)
        hs, done = [None] * parts, {}
        for L in range(len(model.layers) + 1):
            for i, (g, st) in enumerate(zip(gens, streams)):
                after = (i - 1, L) if i else (parts - 1, L - 2)
                if after in done:
                    st.wait_event(done[after])
                with torch.cuda.stream(st):
                    try:
                        next(g)
                    except StopIteration as stop:
                        hs[i] = stop.value
                done[i, L] = torch.cuda.Event()
                done[i, L].record(st)
        for st in streams:
            main.wait_stream(st)
        return model.logits(torch.cat(hs))

    def serial():
        return model.logits(torch.cat([trunk(s, meta) for s, meta in zip(cuts, metas)]))

    return {"whole": whole, f"parts_{parts}": on_streams, f"lock_{parts}": locked, f"serial_{parts}": serial}


def graphed(fn):
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with capture_graph(graph):
            out = fn()
    torch.cuda.synchronize()
    return graph, out


def time_rounds(graphs: dict, reps: int, rounds: int) -> dict[str, float]:
    """us a replay, the median over `rounds` rounds; each round replays every graph in turn."""
    times = {k: [] for k in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for g in graphs.values():
        for _ in range(3):
            g.replay()
    for _ in range(rounds):
        for k, g in graphs.items():
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            times[k].append(1e3 * start.elapsed_time(end) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def probe(name: str, batch: int, ctx: int, variants: list[str], reps: int, rounds: int, page: int) -> dict:
    model = build(name)
    inputs = decode_inputs(model, batch, ctx, page)
    graphs, outs, fns = {}, {}, {}
    for v in ["whole"] + [v for v in variants if v != "whole"]:
        parts = int(v.split("_")[1]) if "_" in v else 1
        fns[v] = make_forwards(model, *inputs, parts)[v]
    for k, fn in fns.items():  # each graph its own memory pool
        graphs[k], outs[k] = graphed(fn)
    for g in graphs.values():  # a captured graph's outputs hold nothing until it is replayed
        g.replay()
    torch.cuda.synchronize()
    same = {k: bool(torch.equal(outs[k], outs["whole"])) for k in outs if k != "whole"}
    us = time_rounds(graphs, reps, rounds)
    row = dict(model=name, batch=batch, ctx=ctx, us=us, same_bits=same,
               speedup={k: us["whole"] / v for k, v in us.items() if k != "whole"})
    del graphs, outs, model, inputs
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["qwen3-0.6b"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--ctx", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--variants", nargs="+", default=["parts_2", "lock_2", "serial_2"],
                    help="whole (always timed), parts_N, lock_N, serial_N")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--out", default="split_probe.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("split_probe: needs a CUDA GPU (it times CUDA graph replays)")
    rows = []
    print(f"{'model':<11} {'B':>4} {'ctx':>5} {'whole us':>9}  variants (us, x whole, same bits)")
    for name in a.model:
        for batch in a.batch:
            for ctx in a.ctx:
                r = probe(name, batch, ctx, a.variants, a.reps, a.rounds, a.page)
                rows.append(r)
                rest = "  ".join(f"{k} {v:7.1f} {r['speedup'][k]:.3f}x {int(r['same_bits'][k])}"
                                 for k, v in r["us"].items() if k != "whole")
                print(f"{name:<11} {batch:>4} {ctx:>5} {r['us']['whole']:9.1f}  {rest}", flush=True)
                Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
