"""Our decode step against the same step built from torch's own ops: what an engine on vendor kernels
pays for one decode step at the same shapes. Both are CUDA graphs, so neither pays host launches:

    ours   the engine's decode graph body (miles_fsdp Transformer.forward on a paged KV cache, then
           the logits), as tools/bench/split_probe.py's `whole`
    torch  a Qwen3 layer from torch ops: F.rms_norm, one q|k|v F.linear (cuBLAS), the q / k norms,
           RoPE (rotate-half), the new K/V written into a contiguous [B, kv heads, ctx, D] cache,
           F.scaled_dot_product_attention (GQA) over it, o / gate|up / down by F.linear, SiLU,
           the residual adds; the final norm and the lm_head by F.linear

    compiled  (--compile) the same torch step through torch.compile (Inductor fuses the norms, RoPE,
           SiLU and the adds; gpt-fast's recipe with the graph replayed as ours is)

and the memory roofline of the step (weights + the KV read, at the measured copy rate). With
`--profile N`, N more replays of ours under torch.profiler give each kernel's device time and launches a
step (`kernels` in the JSON, the top ones printed): under PDL a kernel's time runs from its early start, so
its wait is in it. `--variants NAME=CHANGES ...` captures ours again under each change (with_tiles.py's
options, e.g. `sk=--stream-k on`), checks it gives the shipped step's logits bit for bit and times it in the same
rounds (an A/B in one process, against the same weights and caches). Where ours is
level with or under `torch`, the step's distance from the roofline is not ours alone: each op is at
its vendor kernel's speed, and the step is what those kernels cost at these sizes.

    PYTHONPATH=src:kernels python tools/bench/step_peer.py --out step_peer.json
    ... step_peer.py --shapes 256x256 --variants "sk=--stream-k on" "st=--linears-tma-store on"
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import SHAPES, build, hbm_bandwidth  # noqa: E402
from split_probe import decode_inputs, graphed, make_forwards, parse_shapes, time_rounds  # noqa: E402
from with_tiles import changes  # noqa: E402


def torch_step(args, batch: int, ctx: int, dev: str = "cuda"):
    """A decode step of torch ops on random weights: returns the step function (the [B, V] logits)."""
    dt, B = torch.bfloat16, batch
    D, H, KV, Hd, Fd, V = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim, args.vocab_size
    g = torch.Generator(device=dev).manual_seed(1)

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * shape[-1] ** -0.5).to(dt)

    layers = [dict(n1=torch.ones(D, device=dev, dtype=dt), n2=torch.ones(D, device=dev, dtype=dt),
                   qn=torch.ones(Hd, device=dev, dtype=dt), kn=torch.ones(Hd, device=dev, dtype=dt),
                   qkv=w((H + 2 * KV) * Hd, D), o=w(D, H * Hd), gu=w(2 * Fd, D), down=w(D, Fd),
                   k=torch.randn(B, KV, ctx + 1, Hd, generator=g, device=dev).to(dt),
                   v=torch.randn(B, KV, ctx + 1, Hd, generator=g, device=dev).to(dt))
              for _ in range(args.n_layers)]
    emb, norm = w(V, D), torch.ones(D, device=dev, dtype=dt)
    ids = torch.randint(0, V, (B,), generator=g, device=dev)
    pos = torch.full((B,), ctx, dtype=torch.long, device=dev)
    inv = 1.0 / (1e6 ** (torch.arange(0, Hd, 2, device=dev, dtype=torch.float32) / Hd))
    rows = torch.arange(B, device=dev)
    eps = args.norm_eps

    def rope(x, cos, sin):  # x [B, heads, Hd]
        x1, x2 = x[..., : Hd // 2], x[..., Hd // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def step():
        freqs = pos[:, None].float() * inv[None]
        emb_f = torch.cat((freqs, freqs), -1)
        cos, sin = emb_f.cos().to(dt)[:, None], emb_f.sin().to(dt)[:, None]
        h = F.embedding(ids, emb)
        for L in layers:
            x = F.rms_norm(h, (D,), L["n1"], eps)
            q, k, v = F.linear(x, L["qkv"]).split((H * Hd, KV * Hd, KV * Hd), -1)
            q = rope(F.rms_norm(q.view(B, H, Hd), (Hd,), L["qn"], eps), cos, sin)
            k = rope(F.rms_norm(k.view(B, KV, Hd), (Hd,), L["kn"], eps), cos, sin)
            L["k"][rows, :, pos] = k
            L["v"][rows, :, pos] = v.view(B, KV, Hd)
            a = F.scaled_dot_product_attention(q[:, :, None], L["k"], L["v"], enable_gqa=True)
            h = h + F.linear(a.reshape(B, H * Hd), L["o"])
            gt, up = F.linear(F.rms_norm(h, (D,), L["n2"], eps), L["gu"]).chunk(2, -1)
            h = h + F.linear(F.silu(gt) * up, L["down"])
        return F.linear(F.rms_norm(h, (D,), norm, eps), emb)

    return step


def kernel_times(graph, steps: int) -> dict[str, list[float]]:
    """{kernel: [device us a step, launches a step]} over `steps` replays of graph under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    return {e.key: [round(e.self_device_time_total / steps, 2), round(e.count / steps, 2)] for e in events}


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """{name: with_tiles options} from NAME=OPTIONS; each checked by making and undoing its changes."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name.isidentifier() or name in ("ours", "torch", "compiled") or name in out:
            raise SystemExit(f"step_peer: --variants {spec!r}: write NAME=OPTIONS with a new name (letters, digits, "
                             "_; not ours / torch / compiled), e.g. 'sk=--stream-k on'")
        out[name] = shlex.split(rest)
        changes(out[name], f"step_peer --variants {name}")[0]()
    return out


def variant_graphs(fn, variants: dict[str, list[str]]) -> tuple[dict, dict]:
    """({name: graph of fn captured under the variant's changes}, {name: the graph's output})."""
    graphs, outs = {}, {}
    for name, argv in variants.items():
        undo, _ = changes(argv, f"step_peer --variants {name}")
        try:
            graphs[name], outs[name] = graphed(fn)
        finally:
            undo()
    return graphs, outs


def variant_summary(rows: list[dict]) -> dict[str, dict]:
    """{variant: its speed over the shipped step's (ours us / its us) across the rows: geometric mean, min, max,
    the rows read and whether every row gave the shipped logits}, per model and over all (key "all")."""
    out: dict[str, dict] = {}
    for model in sorted({r["model"] for r in rows}) + ["all"]:
        picked = [r for r in rows if model in ("all", r["model"]) and "variants" in r]
        for v in picked[0]["variants"] if picked else ():
            xs = [r["variants"][v]["x_ours"] for r in picked]
            out.setdefault(v, {})[model] = dict(
                geomean=math.exp(sum(map(math.log, xs)) / len(xs)), min=min(xs), max=max(xs), rows=len(xs),
                same_bits=all(r["variants"][v]["same_bits"] for r in picked))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["qwen3-0.6b"], choices=sorted(SHAPES))
    ap.add_argument("--shapes", nargs="+", default=["64x256", "64x1024", "256x256"], metavar="BxCTX",
                    help="batch x context (tokens cached a sequence)")
    ap.add_argument("--compile", action="store_true", help="also time the torch step through torch.compile")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="N more replays of ours under torch.profiler: each kernel's device us and launches a step")
    ap.add_argument("--variants", nargs="+", default=[], metavar="NAME=CHANGES",
                    help="ours again under with_tiles.py's changes, e.g. 'sk=--stream-k on': bits and time")
    ap.add_argument("--out", default="step_peer.json")
    a = ap.parse_args()
    variants = parse_variants(a.variants)
    if a.profile < 0:
        raise SystemExit(f"step_peer: --profile {a.profile}: give a count of replays >= 1 (0, the default, is off)")
    if not torch.cuda.is_available():
        raise SystemExit("step_peer: needs a CUDA GPU (it times CUDA graph replays)")
    shapes = parse_shapes("step_peer", a.shapes)
    bw = hbm_bandwidth()
    rows = []
    print(f"HBM copy {bw / 1e9:.0f} GB/s\n{'model':<11} {'B':>4} {'ctx':>5} {'ours us':>8} {'torch us':>9} "
          f"{'x torch':>8} {'roofline us':>12} {'ours %':>7} {'torch %':>8}")
    for name in a.model:
        model = build(name)
        args = model.args
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if not args.tie_embeddings:  # the embedding's rows are gathered, not streamed
            wbytes -= model.embed.weight.numel() * model.embed.weight.element_size()
        for batch, ctx in shapes:
            inputs = decode_inputs(model, batch, ctx, 64)
            ours, peer = make_forwards(model, *inputs, 1)["whole"], torch_step(args, batch, ctx)
            g_ours, out_ours = graphed(ours)  # the functions (and the tensors they hold) live while the graphs replay
            g_vars, out_vars = variant_graphs(ours, variants)
            g_torch, _ = graphed(peer)
            graphs = dict(ours=g_ours, **g_vars, torch=g_torch)
            for g in (g_ours, *g_vars.values()):  # a captured graph's outputs hold nothing until it is replayed
                g.replay()
            torch.cuda.synchronize()
            same = {v: bool(torch.equal(o, out_ours)) for v, o in out_vars.items()}
            if a.compile:
                compiled = torch.compile(peer, dynamic=False)
                graphs["compiled"] = graphed(compiled)[0]
            us = time_rounds(graphs, a.reps, a.rounds)  # medians of rounds taken in turn, so drift hits all
            kv = 2 * args.n_layers * batch * (ctx + 1) * args.n_kv_heads * args.head_dim * 2
            roof = 1e6 * (wbytes + kv) / bw
            r = dict(model=name, batch=batch, ctx=ctx, ours_us=us["ours"], torch_us=us["torch"], roofline_us=roof)
            if "compiled" in us:
                r["compiled_us"] = us["compiled"]
            if variants:
                r["variants"] = {v: dict(us=us[v], x_ours=us["ours"] / us[v], same_bits=same[v]) for v in variants}
            if a.profile:
                r["kernels"] = kernel_times(g_ours, a.profile)
            rows.append(r)
            print(f"{name:<11} {batch:>4} {ctx:>5} {r['ours_us']:8.1f} {r['torch_us']:9.1f} "
                  f"{r['torch_us'] / r['ours_us']:7.2f}x {roof:12.1f} {100 * roof / r['ours_us']:6.1f}% "
                  f"{100 * roof / r['torch_us']:7.1f}%"
                  + (f"  compiled {r['compiled_us']:8.1f} us ({r['compiled_us'] / r['ours_us']:.2f}x ours, "
                     f"{100 * roof / r['compiled_us']:.1f}%)" if "compiled_us" in r else ""), flush=True)
            for v, d in r.get("variants", {}).items():
                print(f"    {v:<10} {d['us']:8.1f} us  {d['x_ours']:.3f}x the shipped step's speed  "
                      + ("same bits" if d["same_bits"] else "LOGITS DIFFER from the shipped step"), flush=True)
            for kname, (k_us, k_n) in list(r.get("kernels", {}).items())[:8]:
                print(f"    {k_us:9.1f} us {k_n:6.1f}x  {kname[:90]}")
            del g_ours, g_vars, out_vars, out_ours, g_torch, graphs, ours, peer, inputs
            torch.cuda.empty_cache()
            Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), hbm_b_s=bw, rows=rows),
                                              indent=1))
        del model
        torch.cuda.empty_cache()
    summary = variant_summary(rows)
    for v, by_model in summary.items():
        for model, d in by_model.items():
            print(f"{v:<10} {model:<11} {d['geomean']:.3f}x the shipped step's speed (geomean of {d['rows']} "
                  f"shapes; {d['min']:.3f}-{d['max']:.3f}), {'same bits' if d['same_bits'] else 'LOGITS DIFFER'}")
    Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), hbm_b_s=bw, rows=rows,
                                           summary=summary), indent=1))
    print(f"wrote {a.out}")
    differ = sorted({(v, r["model"], r["batch"], r["ctx"]) for r in rows for v, d in r.get("variants", {}).items()
                     if not d["same_bits"]})
    if differ:
        raise SystemExit("step_peer: variants whose logits differ from the shipped step's (model, batch, ctx): "
                         f"{differ}")


if __name__ == "__main__":
    main()
