"""The trainer's optimizer pass: torch's four passes against the one pass it now runs.

Before OptimConfig.one_pass (one rank, bf16 shadows: parallel/local.py, train/trainer.py) a
step's optimizer work was four passes over every parameter:

    grads       bf16 shadow grads -> fp32 accumulators (_foreach_copy_)        2 + 4 B
    norm        get_total_norm over the fp32 grads (clipping)                  4 B
    AdamW       torch's fused kernel, grad_scale = the clip: reads p, g, m, v  16 + 16 B
                and writes all four back (g unscaled, as GradScaler wants)
    shadows     the next step's fp32 -> bf16 cast of the masters (_refresh)    4 + 2 B

~48 B a parameter. The one pass (miles_kernels/_triton/adamw.py, train/optim.py AdamW.step_with)
reads the bf16 grads once for the norm and once in one kernel that updates p, m, v with torch's
fused AdamW values and writes the bf16 shadow: ~30 B. `flat` is the same math over flat buffers
(one tensor each, no address table): the floor the per-tensor pass is measured against.

    python tools/bench/optim_pass.py --out OUT.json             # GPU: 0.6B and the MoE bench's shapes
    TRITON_INTERPRET=1 python tools/bench/optim_pass.py --device cpu --models tiny   # CPU smoke run

Times are CUDA-event medians of --reps after warm-up, host work included (the trainer's host
runs ahead of the GPU, so its share there is less); each pass's first step is compared with
torch's bit for bit (elements that differ; tests/gpu/test_optim_gpu.py asserts 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton


def _is_bf16_of(shadow: torch.Tensor, p: torch.Tensor, exact: bool) -> bool:
    """Whether shadow is p rounded to bf16 to nearest; not exact: or truncated (the interpreter
    truncates where the GPU rounds)."""
    ok = shadow == p.detach().to(torch.bfloat16)
    if not exact:
        ok |= shadow == (p.detach().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return bool(ok.all())


def _shapes(model_name: str) -> list[torch.Size]:
    """The trainable parameter shapes of tools/bench/train.py's model (tied embeddings once)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train import MODELS

    from miles_fsdp.models import ModelArgs, Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(MODELS[model_name]))
    return [p.shape for p in model.parameters()]


def _compare(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 26) -> tuple[float, int]:
    """(max |x - ref| / max(|ref|, 1e-6), elements whose bits differ) of flat fp32 tensors, a chunk
    at a time (the MoE shapes' 2.3B parameters leave no room for whole-size temporaries)."""
    worst, differ = 0.0, 0
    for a, b in zip(x.split(chunk), ref.split(chunk)):
        worst = max(worst, float(((a - b).abs() / b.abs().clamp(min=1e-6)).max()))
        differ += int((a.view(torch.int32) != b.view(torch.int32)).sum())
    return worst, differ


def _time_ms(fn, reps: int, cuda: bool, warmup: int) -> float:
    """Median ms of fn over reps (CUDA events; on the CPU the host clock), after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def gpu_run(models: list[str], reps: int, out: str, device: str = "cuda", warmup: int = 3) -> int:
    cuda = torch.device(device).type == "cuda"
    rows = []
    for name in models:
        rows.append(_bench_model(name, reps, torch.device(device), warmup))
        if cuda:
            torch.cuda.empty_cache()
    failed = not all(r["one_pass_shadow_is_p_in_bf16"] for r in rows)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'model':>16} {'params':>12} {'tensors':>7} {'pass':>9} {'ms':>8} {'x before':>8} {'GB/s':>6} "
          f"{'step-1 rel diff':>15} {'differ':>8}")
    for r in rows:
        for kind in ("before", "one_pass", "flat"):
            diff = (f"{r[kind + '_step1_max_rel_diff']:>15.2e} {r[kind + '_step1_elements_differ']:>8}"
                    if kind != "before" else "")
            print(f"{r['model']:>16} {r['params']:>12,} {r['tensors']:>7} {kind:>9} {r[kind + '_ms']:>8.2f} "
                  f"{r['before_ms'] / r[kind + '_ms']:>7.2f}x {r[kind + '_gbps']:>6.0f} {diff}")
    with open(out, "w") as f:
        json.dump({"device": name, "bytes_per_param": {"before": 48, "one_pass": 30, "flat": 30}, "rows": rows},
                  f, indent=1)
    print(f"wrote {out}")
    if failed:
        print("FAILED: a shadow is not its new parameter in bf16", file=sys.stderr)
    return 1 if failed else 0


def _bench_model(name: str, reps: int, dev: torch.device, warmup: int) -> dict:
    """One model's row: the three passes timed, the first steps compared with torch's."""
    from miles_fsdp.train.optim import AdamW, grad_norm

    cuda = dev.type == "cuda"
    lr, betas, clip = 1e-5, (0.9, 0.999), 1.0
    shapes = _shapes(name)
    sizes = [math.prod(s) for s in shapes]
    n = sum(sizes)
    torch.manual_seed(0)
    p0 = torch.randn(n, device=dev) * 0.02
    g = (torch.randn(n, device=dev) * 1e-3).to(torch.bfloat16)
    grads = list(g.split(sizes))

    # before: torch's passes over per-parameter tensors, as LocalParams and the trainer held them
    masters = [torch.nn.Parameter(x.view(s).clone()) for x, s in zip(p0.split(sizes), shapes)]
    accs = [torch.empty(s, device=dev) for s in shapes]
    shadows = [torch.empty(s, device=dev, dtype=torch.bfloat16) for s in shapes]
    opt = torch.optim.AdamW(masters, lr=lr, betas=betas, fused=True)

    def before():
        torch._foreach_copy_(accs, [x.view(s) for x, s in zip(grads, shapes)])
        for m_, a_ in zip(masters, accs):
            m_.grad = a_
        total = torch.nn.utils.get_total_norm(accs, norm_type=2.0)
        opt.found_inf = (~torch.isfinite(total)).float()
        opt.grad_scale = ((total.float() + 1e-6) / clip).clamp(min=1.0)
        opt.step()
        opt.found_inf = opt.grad_scale = None
        torch._foreach_copy_(shadows, [m_.detach() for m_ in masters])

    # the one pass, as the trainer calls it: AdamW.step_with over per-parameter tensors
    params = [torch.nn.Parameter(x.view(s).clone()) for x, s in zip(p0.split(sizes), shapes)]
    one = AdamW(params, lr=lr, betas=betas, fused=cuda or None, foreach=None if cuda else False)
    one_shadows = {p: torch.empty_like(p, dtype=torch.bfloat16) for p in params}
    one_grads = {p: x.view(s) for p, x, s in zip(params, grads, shapes)}

    def one_pass():
        total = grad_norm(list(one_grads.values()))
        one.step_with(one_grads, one_shadows, ((total + 1e-6) / clip).clamp(min=1.0),
                      (~torch.isfinite(total)).float())

    # the same kernel over one flat tensor each (no table of tensors): the floor
    flat_p = torch.nn.Parameter(p0.clone())
    flat = AdamW([flat_p], lr=lr, betas=betas, fused=cuda or None, foreach=None if cuda else False)
    flat_shadow = {flat_p: torch.empty_like(flat_p, dtype=torch.bfloat16)}

    def flat_pass():
        total = grad_norm(grads)  # the per-tensor norm, as the one pass: the same clip
        flat.step_with({flat_p: g}, flat_shadow, ((total + 1e-6) / clip).clamp(min=1.0),
                       (~torch.isfinite(total)).float())

    row = dict(model=name, params=n, tensors=len(shapes))
    before()  # first steps from the same start: compared
    one_pass()
    flat_pass()
    ref = torch.cat([m_.detach().reshape(-1) for m_ in masters])
    for kind, got in (("one_pass", torch.cat([p.detach().reshape(-1) for p in params])), ("flat", flat_p.detach())):
        row[f"{kind}_step1_max_rel_diff"], row[f"{kind}_step1_elements_differ"] = _compare(got, ref)
    row["one_pass_shadow_is_p_in_bf16"] = all(_is_bf16_of(s, p, exact=cuda) for p, s in one_shadows.items())
    del ref
    for kind, fn in (("before", before), ("one_pass", one_pass), ("flat", flat_pass)):
        row[f"{kind}_ms"] = _time_ms(fn, reps, cuda, warmup)
    for kind, nbytes in (("before", 48), ("one_pass", 30), ("flat", 30)):
        row[f"{kind}_gbps"] = n * nbytes / 1e9 / row[f"{kind}_ms"] * 1e3
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-moe-a0.6b"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the GPU mode's code (TRITON_INTERPRET=1, "
                    "model tiny), its times meaningless")
    ap.add_argument("--out", default="bench_optim_pass.json")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("needs CUDA (or --device cpu with TRITON_INTERPRET=1)")
    sys.exit(gpu_run(a.models, a.reps, a.out, a.device, a.warmup))


if __name__ == "__main__":
    main()
