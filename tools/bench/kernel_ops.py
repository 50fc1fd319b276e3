"""Benchmark miles_kernels' Triton (invariant) kernels against cuBLAS/SDPA/torch and the roofline.

    python tools/bench/kernel_ops.py --out bench_kernels.json [--models 0.6b,8b] [--quick]

Needs one CUDA GPU (written for an H100, bf16); finishes in under 4 minutes there. Peak
TFLOP/s and HBM GB/s are measured first (a big cuBLAS matmul, a big device copy), so the
"% roof" columns are against what this GPU actually delivers. Targets (see DESIGN.md):
linear >= 90% of cuBLAS for M >= 1024 and >= 80% HBM for M <= 64; decode attention >= 70% HBM.
"""

import argparse
import datetime
import json
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from miles_kernels import _triton as kt

MODELS = {  # hidden, intermediate, q heads, kv heads, head dim, vocab
    "0.6b": dict(hidden=1024, inter=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936),
    "8b": dict(hidden=4096, inter=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936),
}
MS = [1, 8, 64, 256, 1024, 4096, 16384]
DTYPE = torch.bfloat16


def _ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def timings(fn) -> tuple[float, float | None]:
    """(ms per call launched from Python, as eager code sees it; ms per call replayed from a
    CUDA graph of up to 20 calls: the kernels' own time, host launch cost taken out). The graph
    time is None for calls over 2 ms (launch cost is noise there) or where capture fails."""
    launched = _ms(fn)
    if launched > 2.0:
        return launched, None
    repeats = max(2, min(20, round(2.0 / launched)))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
        replayed = _ms(graph.replay) / repeats
        del graph
    except Exception as e:  # noqa: BLE001 - a capture failure is a result here, not an error
        print(f"  (no graph timing: {type(e).__name__}: {str(e).splitlines()[0][:80]})")
        torch.cuda.synchronize()
        replayed = None
    return launched, replayed


def measure_peaks() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    tflops = 2 * 8192**3 / _ms(lambda: a @ a) / 1e9
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / _ms(lambda: dst.copy_(src)) / 1e6  # read + write
    return {"tflops": tflops, "hbm_gbps": gbps}


def _row(rows, op, shape, t, base, base_name, flops, bytes_, peak):
    """t, base: (launched ms, graph ms) pairs from _times (base may be None: no baseline).
    Throughput and roofline columns use the graph time where there is one (the kernel's own)."""
    (t_ms, t_graph), (base_ms, base_graph) = t, base or (None, None)
    dev_ms = t_graph or t_ms
    roof_ms = max(flops / peak["tflops"] / 1e9, bytes_ / peak["hbm_gbps"] / 1e6)
    rows.append(dict(
        op=op, shape=shape, ms=t_ms, graph_ms=t_graph, baseline=base_name, baseline_ms=base_ms,
        baseline_graph_ms=base_graph, vs_baseline=base_ms / t_ms if base_ms else None,
        vs_baseline_graph=base_graph / t_graph if base_graph and t_graph else None, tflops=flops / dev_ms / 1e9,
        hbm_gbps=bytes_ / dev_ms / 1e6, pct_roofline=roof_ms / dev_ms,
    ))


def bench_linear(rows, name, cfg, peak, ms_list):
    h, qd = cfg["hidden"], cfg["heads"] * cfg["head_dim"]
    shapes = {
        "qkv": ((cfg["heads"] + 2 * cfg["kv_heads"]) * cfg["head_dim"], h),
        "o": (h, qd),
        "gate_up": (2 * cfg["inter"], h),
        "down": (h, cfg["inter"]),
        "lm_head": (cfg["vocab"], h),
    }
    for lname, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda", dtype=DTYPE) * K**-0.5
        for M in ms_list:
            x = torch.randn(M, K, device="cuda", dtype=DTYPE)
            t = timings(lambda: kt.linear(x, w))
            base = timings(lambda: F.linear(x, w))
            _row(rows, f"linear/{name}/{lname}", f"M={M} N={N} K={K}", t, base, "cublas",
                 2 * M * N * K, 2 * (M * K + N * K + M * N), peak)
            del x
        del w
        torch.cuda.empty_cache()


def _decode_inputs(cfg, B, ctx, page):
    H, K, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    n_pages = -(-ctx // page)
    kc = torch.randn(B * n_pages, page, K, D, device="cuda", dtype=DTYPE)
    vc = torch.randn_like(kc)
    bt = torch.arange(B * n_pages, device="cuda", dtype=torch.int32).view(B, n_pages)
    q = torch.randn(B, H, D, device="cuda", dtype=DTYPE)
    cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    kv = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    return q, kc, vc, cu, kv, bt


def bench_decode_attention(rows, name, cfg, peak, page, batches, ctxs):
    H, K, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    for B in batches:
        for ctx in ctxs:
            q, kc, vc, cu, kv, bt = _decode_inputs(cfg, B, ctx, page)
            t = timings(lambda: kt.attention(q, kc, vc, cu, kv, bt, 1, D**-0.5))
            ks = kc.view(B, -1, K, D)[:, :ctx].transpose(1, 2).contiguous()  # [B, K, ctx, D] for SDPA
            vs = vc.view(B, -1, K, D)[:, :ctx].transpose(1, 2).contiguous()
            qs = q[:, :, None]
            base = timings(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True))
            bytes_ = 2 * B * ctx * K * D * 2 + 2 * B * H * D * 2
            _row(rows, f"attn_decode/{name}", f"B={B} ctx={ctx} page={page}", t, base, "sdpa",
                 4 * B * H * ctx * D, bytes_, peak)
            del q, kc, vc, ks, vs
            torch.cuda.empty_cache()


def bench_prefill_attention(rows, name, cfg, peak, page, L, peers: bool = False):
    H, K, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q, kc, vc, _, _, bt = _decode_inputs(cfg, 1, L, page)
    q = torch.randn(L, H, D, device="cuda", dtype=DTYPE)
    cu = torch.tensor([0, L], device="cuda", dtype=torch.int32)
    kv = torch.tensor([L], device="cuda", dtype=torch.int32)
    t = timings(lambda: kt.attention(q, kc, vc, cu, kv, bt, L, D**-0.5))
    qs = q.transpose(0, 1)[None]
    ks = kc.view(-1, K, D)[:L].transpose(0, 1)[None].contiguous()
    vs = vc.view(-1, K, D)[:L].transpose(0, 1)[None].contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
    base = timings(sdpa)
    flops, bytes_ = 2 * H * L * L * D, 2 * (2 * L * H * D + 2 * L * K * D)
    _row(rows, f"attn_prefill/{name}", f"L={L} page={page}", t, base, "sdpa", flops, bytes_, peak)
    if not peers:
        return
    # the trainer's packed forward (on Hopper the Gluon kernel) on the same q / K / V, and which backend SDPA's
    # default is: each backend's time against the default's ("x base" > 1: faster than the default)
    k_p, v_p = ks[0].transpose(0, 1).contiguous(), vs[0].transpose(0, 1).contiguous()
    _row(rows, f"attn_packed/{name}", f"L={L}", timings(lambda: kt.packed_attention(q, k_p, v_p, cu, L, D**-0.5)),
         base, "sdpa", flops, bytes_, peak)
    from miles_kernels._triton import paged_attention as A
    from miles_kernels._triton.gluon_gate import gluon_module

    if gluon_module("gluon_attention") is not None and torch.cuda.get_device_capability() == (9, 0):
        saved, A.GLUON_PAGED = A.GLUON_PAGED, True  # the same prefill by the Gluon kernel (paged_attention.GLUON_PAGED)
        try:
            _row(rows, f"attn_prefill_gluon/{name}", f"L={L} page={page}", timings(lambda: kt.attention(
                q, kc, vc, cu, kv, bt, L, D**-0.5)), base, "sdpa", flops, bytes_, peak)
        finally:
            A.GLUON_PAGED = saved
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def one():
            with sdpa_kernel([backend]):  # noqa: B023
                return sdpa()
        try:
            one()
        except RuntimeError as e:  # a backend that does not take these shapes: reported, not timed
            print(f"  sdpa {backend.name} at {name} L={L}: {str(e).splitlines()[0][:100]}")
            continue
        _row(rows, f"sdpa_{backend.name.lower()}/{name}", f"L={L}", timings(one), base, "sdpa", flops, bytes_, peak)


def bench_fused_rows(rows, name, cfg, peak):
    """The fused row ops against the unfused kernels they replace (same bits), decode to prefill rows."""
    h, H, K, D = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    for M in (64, 256, 4096):
        q, k = (torch.randn(M, n, D, device="cuda", dtype=DTYPE) for n in (H, K))
        qw, kw = torch.randn(D, device="cuda", dtype=DTYPE), torch.randn(D, device="cuda", dtype=DTYPE)
        cos, sin = torch.randn(M, D // 2, device="cuda"), torch.randn(M, D // 2, device="cuda")
        unfused = lambda: (kt.apply_rope(kt.rms_norm(q, qw, 1e-6), cos, sin),  # noqa: E731
                           kt.apply_rope(kt.rms_norm(k, kw, 1e-6), cos, sin))
        _row(rows, f"qk_norm_rope/{name}", f"T={M} H={H} K={K} D={D}",
             timings(lambda: kt.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)), timings(unfused), "rms_norm+rope x2",
             0, 2 * 2 * M * (H + K) * D + 2 * 4 * M * D // 2, peak)
        x, r = torch.randn(M, h, device="cuda", dtype=DTYPE), torch.randn(M, h, device="cuda", dtype=DTYPE)
        w = torch.randn(h, device="cuda", dtype=DTYPE)
        _row(rows, f"add_rms_norm/{name}", f"M={M} D={h}", timings(lambda: kt.add_rms_norm(x, r, w, 1e-6)),
             timings(lambda: kt.rms_norm(x + r, w, 1e-6)), "add+rms_norm", 0, 4 * 2 * M * h, peak)


def bench_row_ops(rows, name, cfg, peak):
    h, inter, V = cfg["hidden"], cfg["inter"], cfg["vocab"]
    H, D, M = cfg["heads"], cfg["head_dim"], 4096
    x = torch.randn(M, h, device="cuda", dtype=DTYPE)
    w = torch.randn(h, device="cuda", dtype=DTYPE)

    def torch_rms():
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE) * w

    _row(rows, f"rms_norm/{name}", f"M={M} D={h}", timings(lambda: kt.rms_norm(x, w, 1e-6)), timings(torch_rms), "torch",
         0, 2 * 2 * M * h, peak)
    gu = torch.randn(M, 2 * inter, device="cuda", dtype=DTYPE)
    g, u = gu[:, :inter], gu[:, inter:]
    _row(rows, f"silu_mul/{name}", f"M={M} F={inter}", timings(lambda: kt.silu_mul(g, u)),
         timings(lambda: (F.silu(g.float()) * u.float()).to(DTYPE)), "torch", 0, 3 * 2 * M * inter, peak)
    q = torch.randn(M, H, D, device="cuda", dtype=DTYPE)
    cos = torch.randn(M, D // 2, device="cuda")
    sin = torch.randn(M, D // 2, device="cuda")
    _row(rows, f"apply_rope/{name}", f"T={M} H={H} D={D}", timings(lambda: kt.apply_rope(q, cos, sin)), None, "-",
         0, 2 * 2 * M * H * D + 2 * 4 * M * D // 2, peak)
    bench_fused_rows(rows, name, cfg, peak)
    for T in (1, 1024, 4096):
        logits = torch.randn(T, V, device="cuda", dtype=DTYPE)
        ids = torch.randint(0, V, (T,), device="cuda")
        base = timings(lambda: torch.log_softmax(logits.float() / 0.7, -1).gather(1, ids[:, None]))
        _row(rows, f"logprobs/{name}", f"T={T} V={V}", timings(lambda: kt.logprobs(logits, ids, 0.7)), base, "torch",
             0, 2 * T * V, peak)
        del logits
    router = torch.randn(4096, 128, device="cuda", dtype=DTYPE)
    base = timings(lambda: torch.topk(torch.softmax(router.float(), -1), 8))
    _row(rows, "route_topk", "T=4096 E=128 k=8", timings(lambda: kt.route_topk(router, 8, True)), base, "torch",
         0, 2 * 4096 * 128, peak)


def bench_grouped(rows, peak):
    # Qwen3-30B-A3B experts: hidden 2048, moe_intermediate 768, 128 experts, top-8
    E, K, N, R = 128, 2048, 2 * 768, 4096 * 8
    x = torch.randn(R, K, device="cuda", dtype=DTYPE)
    w = torch.randn(E, N, K, device="cuda", dtype=DTYPE) * K**-0.5
    sizes = torch.full((E,), R // E, dtype=torch.int64)
    offs = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    offs[1:] = sizes.cumsum(0).cuda()
    base = timings(lambda: F.linear(x, w[0]))  # one dense matmul of the same FLOPs: an upper bound
    t = timings(lambda: kt.grouped_linear(x, w, offs))  # tiles by shape: tools/bench/grouped_sweep.py
    _row(rows, "grouped_linear/30b-a3b/gate_up", f"R={R} E={E} N={N} K={K}", t, base, "cublas dense",
         2 * R * N * K, 2 * (R * K + E * N * K + R * N), peak)


def print_table(rows):
    """ms / base / x base: launched from Python (eager code); graph columns: replayed from a CUDA
    graph (the kernels alone, as the engine's decode runs them); TF/s, GB/s, %roof from graph ms."""
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'op':34} {'shape':28} {'ms':>8} {'base':>8} {'x base':>6} {'graph':>8} {'base':>8} {'x base':>6} "
          f"{'TF/s':>6} {'GB/s':>6} {'%roof':>6}")
    for r in rows:
        print(f"{r['op']:34} {r['shape']:28} {r['ms']:8.4f} {f(r['baseline_ms'], '8.4f'):>8} "
              f"{f(r['vs_baseline'], '.2f'):>6} {f(r['graph_ms'], '8.4f'):>8} {f(r['baseline_graph_ms'], '8.4f'):>8} "
              f"{f(r['vs_baseline_graph'], '.2f'):>6} {r['tflops']:6.1f} {r['hbm_gbps']:6.0f} {100 * r['pct_roofline']:5.0f}%")


def main():
    ap = argparse.ArgumentParser(description="miles_kernels Triton kernel benchmark (one CUDA GPU)")
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--models", default="0.6b,8b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--page-size", type=int, default=64, help="KV page size (multiple of ATTN_BLOCK)")
    ap.add_argument("--quick", action="store_true", help="fewer M values and decode shapes (smoke run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/kernel_ops.py needs a CUDA GPU")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)
    peak = measure_peaks()
    print(f"{torch.cuda.get_device_name()}: peak {peak['tflops']:.0f} TFLOP/s bf16, {peak['hbm_gbps']:.0f} GB/s HBM")
    ms_list = [1, 64, 1024, 4096] if args.quick else MS
    batches, ctxs = ([1, 64], [4096]) if args.quick else ([1, 8, 64, 256], [1024, 4096, 16384])
    rows = []
    for m in models:
        cfg = MODELS[m]
        bench_linear(rows, m, cfg, peak, ms_list)
        bench_decode_attention(rows, m, cfg, peak, args.page_size, batches, ctxs)
        for L in (4096,) if args.quick else (1024, 4096, 16384):
            bench_prefill_attention(rows, m, cfg, peak, args.page_size, L, peers=True)
            if args.page_size != 16:  # the trainer's scratch layout (TRAIN_PAGE_SIZE): KV blocks span pages
                bench_prefill_attention(rows, m, cfg, peak, 16, L)
        bench_row_ops(rows, m, cfg, peak)
    bench_grouped(rows, peak)
    print_table(rows)
    result = dict(
        device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__, triton=__import__("triton").__version__, host=platform.node(), dtype="bf16",
        peak=peak, rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
