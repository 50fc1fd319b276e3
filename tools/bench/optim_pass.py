"""Probe: the trainer's optimizer pass as one Triton kernel, against the pass it runs today.

Today (one rank, bf16 shadows: parallel/local.py, train/trainer.py) a step's optimizer work is
four passes over every parameter:

    grads       bf16 shadow grads -> fp32 accumulators (_foreach_copy_)        2 + 4 B
    norm        get_total_norm over the fp32 grads (clipping)                  4 B
    AdamW       torch's fused kernel, grad_scale = the clip: reads p, g, m, v  16 + 16 B
                and writes all four back (g unscaled, as GradScaler wants)
    shadows     the next step's fp32 -> bf16 cast of the masters (_refresh)    4 + 2 B

~48 B a parameter. The probe's pass reads the bf16 grads once for the norm and once in one
kernel that updates p, m, v with torch's AdamW math (its fmas, IEEE sqrt and divisions) and
writes the bf16 shadow: ~30 B; found_inf and grad_scale read on the device as torch's. Two
forms of the kernel: over flat buffers (`adamw_pass`: the trainer would need its masters, moments
and shadows as views of flat storage) and over lists of tensors by an address table
(`adamw_table`: one launch for the model's tensors as the trainer holds them; 16-byte aligned).

    python tools/bench/optim_pass.py --out OUT.json             # GPU: 0.6B and the MoE bench's shapes
    TRITON_INTERPRET=1 python tools/bench/optim_pass.py --cpu-check   # CPU: the kernel's math

GPU mode times the three passes (CUDA events, median of --reps after warm-up) on the parameter
shapes of tools/bench/train.py's models and compares each kernel's first step with torch's
(max relative difference and elements that differ: equal bits are the goal, not assumed).
--cpu-check runs the kernels in the interpreter against a float64 AdamW, the table kernel against
the flat one bitwise, and checks found_inf skips the step.
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
import triton.language as tl

BLOCK = 4096


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, ok, lr, beta1, beta2, weight_decay, eps, bc1, bc2_sqrt,
                 scale_ptr, HAS_SCALE: tl.constexpr, WRITE_SHADOW: tl.constexpr):
    """One AdamW step of p, m, v (fp32) at offs from g (any float dtype), torch's fused math
    (aten/src/ATen/native/cuda/fused_adam_utils.cuh, ADAMW); the bf16 shadow of the new p.
    ok: the mask, or None where the whole block is inside (unmasked accesses vectorize)."""
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr))
    p = tl.load(p_ptr + offs, mask=ok)
    m = tl.load(m_ptr + offs, mask=ok)
    v = tl.load(v_ptr + offs, mask=ok)
    p = tl.fma(-(lr * weight_decay), p, p)  # param -= lr * weight_decay * param (nvcc contracts it)
    m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
    gg = g * g
    v = tl.fma(beta2, v, tl.fma(-beta2, gg, gg))
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(tl.div_rn(lr, bc1) * m, denom)
    tl.store(p_ptr + offs, p, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if WRITE_SHADOW:
        tl.store(s_ptr + offs, p.to(s_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)


@triton.jit
def _adamw_pass_kernel(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, n, lr, beta1, beta2, weight_decay, eps, bc1, bc2_sqrt,
                       scale_ptr, inf_ptr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_SHADOW: tl.constexpr):
    """_adamw_block over flat buffers, BLOCK elements a program; nothing where found_inf is set."""
    if tl.load(inf_ptr) != 0:  # found_inf: the step is skipped, nothing written
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, offs < n, lr, beta1, beta2, weight_decay, eps, bc1,
                 bc2_sqrt, scale_ptr, HAS_SCALE, WRITE_SHADOW)


@triton.jit
def _adamw_table_kernel(tab_ptr, chunk_ptr, n_tensors, lr, beta1, beta2, weight_decay, eps, bc1, bc2_sqrt, scale_ptr,
                        inf_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, G_DTYPE: tl.constexpr,
                        HAS_SCALE: tl.constexpr, WRITE_SHADOW: tl.constexpr):
    """_adamw_block over a list of tensors (no flat storage): program c takes CHUNK elements of
    tensor chunk_ptr[2c] from element chunk_ptr[2c + 1]; tab_ptr [6, n_tensors] holds each
    tensor's p, g, m, v and shadow addresses and its numel."""
    if tl.load(inf_ptr) != 0:
        return
    c = tl.program_id(0)
    i = tl.load(chunk_ptr + 2 * c)
    start = tl.load(chunk_ptr + 2 * c + 1)
    # every address 16-byte aligned (adamw_table checks): whole blocks load and store 16 bytes a thread
    p_ptr = tl.multiple_of(tl.load(tab_ptr + i).to(tl.pointer_type(tl.float32)), 16)
    g_ptr = tl.multiple_of(tl.load(tab_ptr + n_tensors + i).to(tl.pointer_type(G_DTYPE)), 16)
    m_ptr = tl.multiple_of(tl.load(tab_ptr + 2 * n_tensors + i).to(tl.pointer_type(tl.float32)), 16)
    v_ptr = tl.multiple_of(tl.load(tab_ptr + 3 * n_tensors + i).to(tl.pointer_type(tl.float32)), 16)
    s_ptr = tl.multiple_of(tl.load(tab_ptr + 4 * n_tensors + i).to(tl.pointer_type(tl.bfloat16)), 16)
    n = tl.load(tab_ptr + 5 * n_tensors + i)
    for k in range(0, CHUNK, BLOCK):
        offs = tl.multiple_of(start + k, BLOCK) + tl.arange(0, BLOCK)
        if start + k + BLOCK <= n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, None, lr, beta1, beta2, weight_decay, eps, bc1,
                         bc2_sqrt, scale_ptr, HAS_SCALE, WRITE_SHADOW)
        elif start + k < n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, offs, offs < n, lr, beta1, beta2, weight_decay, eps,
                         bc1, bc2_sqrt, scale_ptr, HAS_SCALE, WRITE_SHADOW)


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """1 - beta1^step and sqrt(1 - beta2^step) in fp32, as torch's kernel makes them."""
    f = torch.tensor
    bc1 = 1 - torch.pow(f(beta1, dtype=torch.float32), f(float(step)))
    bc2 = 1 - torch.pow(f(beta2, dtype=torch.float32), f(float(step)))
    return float(bc1), float(torch.sqrt(bc2))


def adamw_pass(p, g, m, v, shadow, step: int, lr: float, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step over flat fp32 p, m, v from flat g (bf16 or fp32), in place; shadow (bf16,
    or None) gets the new p. grad_scale / found_inf: one-element fp32 device tensors or None."""
    n = p.numel()
    bc1, bc2_sqrt = bias_corrections(betas[0], betas[1], step)
    inf = found_inf if found_inf is not None else torch.zeros(1, device=p.device)
    scale = grad_scale if grad_scale is not None else inf
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731 (torch's opmath casts)
    _adamw_pass_kernel[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, shadow if shadow is not None else p, n, f32(lr), f32(betas[0]), f32(betas[1]),
        f32(weight_decay), f32(eps), bc1, bc2_sqrt, scale, inf, BLOCK=BLOCK, HAS_SCALE=grad_scale is not None,
        WRITE_SHADOW=shadow is not None, num_warps=8)


CHUNK = 65536  # elements a program of the table kernel
_CHUNKS: dict = {}


def adamw_table(params, grads, exp_avgs, exp_avg_sqs, shadows, step: int, lr: float, betas=(0.9, 0.999),
                weight_decay=0.0, eps=1e-8, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None) -> None:
    """adamw_pass over lists of tensors (fp32 params / moments, grads of one float dtype, bf16
    shadows): one launch, their addresses in a table (rebuilt each call: grads are new tensors
    each backward)."""
    dev = params[0].device
    numels = [p.numel() for p in params]
    groups = (params, grads, exp_avgs, exp_avg_sqs, shadows)
    if not all(x.is_contiguous() and x.data_ptr() % 16 == 0 for xs in groups for x in xs):
        raise ValueError("adamw_table: every tensor must be contiguous and 16-byte aligned")
    tab = torch.tensor([[x.data_ptr() for x in xs] for xs in groups]
                       + [numels], dtype=torch.int64).to(dev, non_blocking=True)
    key = (tuple(numels), dev)
    if key not in _CHUNKS:  # (tensor, first element) a program: fixed by the shapes
        _CHUNKS[key] = torch.tensor([(i, s) for i, n in enumerate(numels) for s in range(0, n, CHUNK)],
                                    dtype=torch.int64).to(dev)
    chunks = _CHUNKS[key]
    bc1, bc2_sqrt = bias_corrections(betas[0], betas[1], step)
    inf = found_inf if found_inf is not None else torch.zeros(1, device=dev)
    scale = grad_scale if grad_scale is not None else inf
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    g_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[grads[0].dtype]
    _adamw_table_kernel[(chunks.shape[0],)](
        tab, chunks, len(params), f32(lr), f32(betas[0]), f32(betas[1]), f32(weight_decay), f32(eps), bc1, bc2_sqrt,
        scale, inf, CHUNK=CHUNK, BLOCK=BLOCK, G_DTYPE=g_dtype, HAS_SCALE=grad_scale is not None, WRITE_SHADOW=True,
        num_warps=8)


def _is_bf16_of(shadow: torch.Tensor, p: torch.Tensor, exact: bool) -> bool:
    """Whether shadow is p rounded to bf16 to nearest; not exact: or truncated (the interpreter
    truncates where the GPU rounds)."""
    ok = shadow == p.to(torch.bfloat16)
    if not exact:
        ok |= shadow == (p.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return bool(ok.all())


def cpu_check() -> int:
    """The kernel (interpreter) against a float64 AdamW over 3 steps; found_inf skips a step."""
    torch.manual_seed(0)
    n, lr, betas, wd, eps = 10_000, 1e-3, (0.9, 0.999), 0.1, 1e-8
    p = torch.randn(n)
    m, v = torch.zeros(n), torch.zeros(n)
    shadow = torch.empty(n, dtype=torch.bfloat16)
    rp, rm, rv = p.double(), m.double(), v.double()
    worst = 0.0
    for step in (1, 2, 3):
        g = torch.randn(n).to(torch.bfloat16)
        scale = torch.tensor([2.0])
        adamw_pass(p, g, m, v, shadow, step, lr, betas, wd, eps, grad_scale=scale)
        gd = g.double() / 2.0
        rp = rp - lr * wd * rp
        rm = betas[0] * rm + (1 - betas[0]) * gd
        rv = betas[1] * rv + (1 - betas[1]) * gd * gd
        rp = rp - lr / (1 - betas[0]**step) * rm / (rv.sqrt() / math.sqrt(1 - betas[1]**step) + eps)
        worst = max(worst, float(((p.double() - rp).abs() / rp.abs().clamp(min=1e-3)).max()))
        if not _is_bf16_of(shadow, p, exact=False):
            print("FAILED: the shadow is not the new p in bf16")
            return 1
    # the table kernel over three tensors (chunk and block edges inside them) == the flat kernel
    sizes = [CHUNK + 8, 8, 2 * BLOCK + 24]  # 16-byte aligned views of one buffer
    flat = [torch.randn(sum(sizes)) for _ in range(3)]
    fg = torch.randn(sum(sizes)).to(torch.bfloat16)
    fs = torch.empty(sum(sizes), dtype=torch.bfloat16)
    lists = [list(x.clone().split(sizes)) for x in flat]
    ls = list(torch.empty(sum(sizes), dtype=torch.bfloat16).split(sizes))
    flat[2].abs_()
    lists[2] = [x.abs() for x in lists[2]]
    adamw_pass(flat[0], fg, flat[1], flat[2], fs, 5, lr, betas, wd, eps, grad_scale=torch.tensor([3.0]))
    adamw_table(lists[0], list(fg.split(sizes)), lists[1], lists[2], ls, 5, lr, betas, wd, eps,
                grad_scale=torch.tensor([3.0]))
    same = all(torch.equal(f, torch.cat(lst)) for f, lst in zip(flat, lists)) and torch.equal(fs, torch.cat(ls))
    print(f"table kernel == flat kernel bitwise: {same}")
    if not same:
        return 1
    before = (p.clone(), m.clone(), v.clone())
    adamw_pass(p, torch.randn(n).to(torch.bfloat16), m, v, shadow, 4, lr, betas, wd, eps,
               found_inf=torch.tensor([1.0]))
    skipped = all(torch.equal(a, b) for a, b in zip(before, (p, m, v)))
    print(f"max rel diff vs float64 AdamW over 3 steps: {worst:.2e}; found_inf skipped the step: {skipped}")
    return 0 if worst < 1e-5 and skipped else 1


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
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    lr, betas, clip = 1e-5, (0.9, 0.999), 1.0
    rows, failed = [], False
    for name in models:
        shapes = _shapes(name)
        sizes = [math.prod(s) for s in shapes]
        n = sum(sizes)
        torch.manual_seed(0)
        # today's pass: per-parameter tensors, as LocalParams and the trainer hold them
        masters = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
        grads = [torch.randn(s, device=dev).to(torch.bfloat16) * 1e-3 for s in shapes]
        accs = [torch.empty(s, device=dev) for s in shapes]
        shadows = [torch.empty(s, device=dev, dtype=torch.bfloat16) for s in shapes]
        opt = torch.optim.AdamW(masters, lr=lr, betas=betas, fused=True)
        p0 = torch.cat([m.detach().reshape(-1) for m in masters])

        def today(total=None):
            torch._foreach_copy_(accs, grads)
            for m_, a_ in zip(masters, accs):
                m_.grad = a_
            if total is None:
                total = torch.nn.utils.get_total_norm(accs, norm_type=2.0)
            opt.found_inf = (~torch.isfinite(total)).float()
            opt.grad_scale = ((total.float() + 1e-6) / clip).clamp(min=1.0)
            opt.step()
            opt.found_inf = opt.grad_scale = None
            torch._foreach_copy_(shadows, [m_.detach() for m_ in masters])

        # the probe's pass: flat buffers
        p = p0.clone()
        g = torch.cat([x.reshape(-1) for x in grads])
        m, v = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        shadow = torch.empty(n, device=dev, dtype=torch.bfloat16)
        state = {"step": 0}

        def fused(total=None):
            state["step"] += 1
            if total is None:
                total = torch.linalg.vector_norm(g, dtype=torch.float32)
            adamw_pass(p, g, m, v, shadow, state["step"], lr, betas, grad_scale=((total + 1e-6) / clip).clamp(min=1.0),
                       found_inf=(~torch.isfinite(total)).float())

        # the table kernel: the same buffers as per-parameter views (a list of tensors, as the trainer holds them)
        views = [list(x.split(sizes)) for x in (p, g, m, v, shadow)]

        def table(total=None):
            state["step"] += 1
            if total is None:
                total = torch.linalg.vector_norm(g, dtype=torch.float32)
            adamw_table(*views, state["step"], lr, betas, grad_scale=((total + 1e-6) / clip).clamp(min=1.0),
                        found_inf=(~torch.isfinite(total)).float())

        # one step each from the same start and the same clip: the parameters compared
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x, dtype=torch.float32) for x in grads]))
        today(total)
        got = torch.cat([x.detach().reshape(-1) for x in masters])
        row = dict(model=name, params=n, tensors=len(shapes))
        for kind, fn in (("flat", fused), ("table", table)):
            p.copy_(p0)
            m.zero_()
            v.zero_()
            state["step"] = 0
            fn(total)
            row[f"{kind}_step1_max_rel_diff"], row[f"{kind}_step1_elements_differ"] = _compare(p, got)
            row[f"{kind}_shadow_is_p_in_bf16"] = _is_bf16_of(shadow, p, exact=cuda)
            failed |= not row[f"{kind}_shadow_is_p_in_bf16"]
        row["today_ms"] = _time_ms(today, reps, cuda, warmup)
        row["flat_ms"] = _time_ms(fused, reps, cuda, warmup)
        row["table_ms"] = _time_ms(table, reps, cuda, warmup)
        for kind, nbytes in (("today", 48), ("flat", 30), ("table", 30)):
            row[f"{kind}_gbps"] = n * nbytes / 1e9 / row[f"{kind}_ms"] * 1e3
        rows.append(row)
        del masters, grads, accs, shadows, opt, p, g, m, v, shadow, views
        if cuda:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'model':>16} {'params':>12} {'tensors':>7} {'pass':>6} {'ms':>8} {'x today':>7} {'GB/s':>6} "
          f"{'step-1 rel diff':>15} {'differ':>10}")
    for r in rows:
        for kind in ("today", "flat", "table"):
            diff = (f"{r[kind + '_step1_max_rel_diff']:>15.2e} {r[kind + '_step1_elements_differ']:>10}"
                    if kind != "today" else "")
            print(f"{r['model']:>16} {r['params']:>12,} {r['tensors']:>7} {kind:>6} {r[kind + '_ms']:>8.2f} "
                  f"{r['today_ms'] / r[kind + '_ms']:>6.2f}x {r[kind + '_gbps']:>6.0f} {diff}")
    with open(out, "w") as f:
        json.dump({"device": name, "bytes_per_param": {"today": 48, "flat": 30, "table": 30},
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    if failed:
        print("FAILED: a shadow is not its new parameter in bf16", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true", help="the kernel's math in the interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-moe-a0.6b"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of GPU mode's code (TRITON_INTERPRET=1, "
                    "model small), its times meaningless")
    ap.add_argument("--out", default="bench_optim_pass.json")
    a = ap.parse_args()
    if a.cpu_check:
        sys.exit(cpu_check())
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("GPU mode needs CUDA (or --cpu-check / --device cpu with TRITON_INTERPRET=1)")
    sys.exit(gpu_run(a.models, a.reps, a.out, a.device, a.warmup))


if __name__ == "__main__":
    main()
