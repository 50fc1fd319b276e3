"""Offline throughput of the rollout engine vs transformers, and vs the memory roofline.

Random-weight Qwen3-0.6B- and Qwen3-8B-shaped models in bf16 (built on meta, initialised on
the device: no files). Every sample generates exactly `new` tokens (temperature 1, eos
ignored). Rows: our engine in invariant mode (the on-policy default) and in fast mode
(mk.use_mode("fast"): cuBLAS/SDPA, no bitwise guarantee), transformers `generate`
(static padded batch) and transformers continuous batching (`generate_batch`, if the
installed version has it), and our engine with EngineConfig.overlap_schedule off
(`engine-no-overlap`). Transformers, fast mode and no-overlap run on a subset (see `plan`).
roofline_tok_s: tokens/s if every decode step only streamed the weights plus the KV read
by the step at the measured HBM bandwidth (prefill ignored): an upper bound for decode.
prefill_roofline_tok_s: the same with the prompts' prefill added at the measured bf16 matmul
peak (the layers' linears and causal attention, 2 FLOPs a multiply-add): the bound for a run
whose prompts the prefix cache has not seen. An engine row's warm run (graphs captured, new prompts) is
split by a run to the first token only: its ms, then the ms of each later decode step (wall, host work
included), to set beside tools/bench/step_peer.py's graph-only step.

    python tools/bench/engine.py --out bench_engine.json           # full sweep, ~6 min on an H100
    python tools/bench/engine.py --quick --out bench_engine.json   # smaller sweep
    python tools/bench/engine.py --profile DIR                      # per-phase step times + torch.profiler;
                                                                    # a prefill of new prompts: wall ms + kernels
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import time
import traceback

import torch

import miles_kernels as mk
from gpu_clock import ClockSampler
from miles_fsdp.engine import Engine, EngineConfig, Request, SamplingParams
from miles_fsdp.models import ModelArgs, Transformer

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, max_position_embeddings=40960,
              rms_norm_eps=1e-6, rope_theta=1e6, head_dim=128, num_key_value_heads=8, hidden_act="silu")
SHAPES = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
}


def plan(quick: bool) -> list[tuple[str, str, int, int, int]]:
    """(model, system, batch, prompt, new) rows, cheapest first within each model."""
    rows = []
    grid = [(b, p, n) for b in (64, 256) for p in (128, 1024) for n in (256, 1024)]
    if quick:
        grid = [(64, 128, 256), (256, 1024, 256)]
    for model in SHAPES:
        g = grid if model == "qwen3-0.6b" or quick else [x for x in grid if x[2] == 256]
        rows += [(model, "engine", *x) for x in g]
        rows += [(model, "engine-fast", *x) for x in g if x[2] == 256]  # fast >= invariant: both batches
        rows += [(model, "engine-no-overlap", *x) for x in g if x[2] == 256 and x[1] == 128]
        rows += [(model, "hf-generate", 64, 128, 256), (model, "hf-generate-batch", 64, 128, 256)]
    return rows


# host-overhead probe on CPU: tiny dims, the 0.6B's layer count and vocab shape kept small
TINY = dict(_QWEN3, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def build(name: str, device: str = "cuda") -> Transformer:
    args = ModelArgs.from_hf(dict(TINY if name == "tiny" else SHAPES[name]))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()


def hbm_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() / (time.perf_counter() - t)  # read + write


def roofline_tok_s(args: ModelArgs, weight_bytes: int, bw: float, batch: int, prompt: int, new: int) -> float:
    kv_tok = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2
    step_bytes = weight_bytes + batch * (prompt + new / 2) * kv_tok  # mean KV read per step
    return batch * bw / step_bytes


def matmul_peak() -> float:
    """bf16 FLOP/s of an 8192^3 cuBLAS matmul on this device."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def prefill_roofline_tok_s(args: ModelArgs, decode_tok_s: float, peak: float, batch: int, prompt: int,
                           new: int) -> float:
    """decode_tok_s (roofline_tok_s) with the prompts' prefill FLOPs added at `peak` FLOP/s: every
    layer's linears on each prompt token, causal attention's two matmuls over prompt^2 / 2 pairs."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linear = args.dim * (2 * q + 2 * kv) + 3 * args.dim * args.ffn_dim  # q, k, v, o; gate, up, down
    flops = 2 * args.n_layers * batch * (prompt * linear + prompt * prompt * q)
    return batch * new / (batch * new / decode_tok_s + flops / peak)


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def run_engine(engine: Engine, ids: list[list[int]], new: int) -> dict:
    p = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
    before, retries = engine.stats()["num_preemptions"], alloc_retries(engine.runner.device)
    overlapped = engine.metrics().get("engine/overlap_steps_total", 0.0)
    pauses = GcPauses()
    with ClockSampler() as clock:  # started and stopped outside the timed part
        gc.callbacks.append(pauses)
        _sync(engine.runner.device)
        t = time.perf_counter()
        try:
            res = engine.generate([Request(x, p) for x in ids])
            _sync(engine.runner.device)
        finally:
            gc.callbacks.remove(pauses)
        wall = time.perf_counter() - t
    assert all(len(r[0].token_ids) == new for r in res)
    return dict(wall_s=wall, preemptions=engine.stats()["num_preemptions"] - before,
                alloc_retries=alloc_retries(engine.runner.device) - retries,
                overlapped=int(engine.metrics().get("engine/overlap_steps_total", 0.0) - overlapped),
                gc_ms=1e3 * pauses.seconds, gc_runs=pauses.runs, clock=clock.result)


class GcPauses:
    """A gc.callbacks entry that adds up the collector's pauses (seconds) and counts its runs."""

    def __init__(self):
        self.seconds, self.runs, self._t = 0.0, 0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.runs, self._t = self.runs + 1, None


def alloc_retries(dev: torch.device) -> int:
    """The CUDA caching allocator's retries so far (a malloc that failed, freed the cache and synced):
    a run that has them is short of memory beside the KV cache."""
    return torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) if dev.type == "cuda" else 0


def hf_model(name: str):
    import transformers as tf

    cfg = tf.Qwen3Config(**{k: v for k, v in SHAPES[name].items() if k != "architectures"})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of an 8B model on the way
    try:
        with torch.device("cuda"):
            return tf.Qwen3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def run_hf(model, system: str, ids: list[list[int]], new: int) -> dict:
    from transformers import GenerationConfig

    gc_ = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0,
                           eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    if system == "hf-generate":
        x = torch.tensor(ids, device="cuda")
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc_)
        assert out.shape[1] == x.shape[1] + new
    else:
        if not hasattr(model, "generate_batch"):
            return dict(skipped="transformers has no generate_batch")
        with torch.no_grad():
            model.generate_batch(inputs=ids, generation_config=gc_)
    torch.cuda.synchronize()
    return dict(wall_s=time.perf_counter() - t)


# --- profile: where a decode step's (and a prefill's) time goes ---------------------------------------------

def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _wrap(obj, attr: str, key: str, acc: dict, dev) -> None:
    """Replace obj.attr by a version that syncs, times and adds its seconds to acc[key]."""
    fn = getattr(obj, attr)

    def timed(*a, **k):
        _sync(dev)
        t = time.perf_counter()
        out = fn(*a, **k)
        _sync(dev)
        acc[key] += time.perf_counter() - t
        return out

    setattr(obj, attr, timed)


def phase_times(engine: Engine, ids: list[list[int]], new: int) -> dict:
    """Seconds per decode step in each phase (sync-bounded, so GPU work counts where it is
    launched). 'prepare' = run - model - sample. Prefill steps are excluded."""
    dev, acc = engine.runner.device, collections.defaultdict(float)
    r, s = engine.runner, engine.scheduler
    saved = {(o, a): o.__dict__.get(a) for o, a in
             ((s, "schedule"), (s, "postprocess"), (r, "run"), (r, "logits"), (r, "sample_launch"))}
    _wrap(s, "schedule", "schedule", acc, dev)
    _wrap(r, "run", "run", acc, dev)
    _wrap(s, "postprocess", "postprocess", acc, dev)
    _wrap(r, "logits", "model", acc, dev)  # forward (graph replay or eager) + logits
    _wrap(r, "sample_launch", "sample", acc, dev)
    add_requests(engine, ids, new)
    steps, t_all = 0, 0.0
    while engine.has_unfinished():
        before = dict(acc)
        t = time.perf_counter()
        batch_probe = [engine.scheduler.running, engine.scheduler.waiting]
        decode = not batch_probe[1] and all(q.num_uncomputed == 1 for q in batch_probe[0])
        engine.step()
        if not decode:  # drop prefill steps
            for k in list(acc):
                acc[k] = before.get(k, 0.0)
            continue
        t_all += time.perf_counter() - t
        steps += 1
    for (o, a), v in saved.items():
        if v is None:
            o.__dict__.pop(a, None)
        else:
            setattr(o, a, v)
    out = {k: 1e3 * v / max(steps, 1) for k, v in acc.items()}
    out["prepare"] = out.get("run", 0.0) - out.get("model", 0.0) - out.get("sample", 0.0)
    out["step"] = 1e3 * t_all / max(steps, 1)
    out["decode_steps"] = steps
    return out


def add_requests(engine: Engine, ids: list[list[int]], new: int) -> None:
    """Queue one request a prompt: `new` tokens each, temperature 1, eos ignored."""
    p = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
    for x in ids:
        engine.add_request(Request(x, p))


def prefill(engine: Engine, ids: list[list[int]], new: int) -> int:
    """Add the requests and step until every prompt is prefilled (decode steps left); the steps taken."""
    add_requests(engine, ids, new)
    n = 0
    while engine.scheduler.waiting or any(q.num_uncomputed > 1 for q in engine.scheduler.running):
        engine.step()
        n += 1
    return n


def finish(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def prefill_profile(engine: Engine, batch: int, plen: int, vocab: int, new: int) -> dict:
    """A prefill of `batch` new prompts of `plen` tokens (up to the first decode step; prompts no run has
    seen, so the prefix cache holds none): synced wall ms, then another such prefill's kernels under
    torch.profiler (GPU us and calls, the whole prefill)."""
    from torch.profiler import ProfilerActivity, profile as tprof

    dev = engine.runner.device
    _sync(dev)
    t = time.perf_counter()
    steps = prefill(engine, prompts(batch, plen, vocab, seed=3001), new)
    _sync(dev)
    wall_ms = 1e3 * (time.perf_counter() - t)
    finish(engine)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprof(activities=activities) as prof:
        prefill(engine, prompts(batch, plen, vocab, seed=3002), new)
        _sync(dev)
    finish(engine)
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    return dict(prefill_ms=wall_ms, prefill_steps=steps,
                prefill_gpu_ms=sum(e.self_device_time_total for e in events) / 1e3,
                prefill_kernels_us={e.key: [round(e.self_device_time_total, 1), e.count] for e in events[:20]})


def decode_step_ms(engine: Engine, ids: list[list[int]], new: int) -> float:
    """Un-instrumented wall ms per decode step (no extra syncs)."""
    prefill(engine, ids, new)
    _sync(engine.runner.device)
    t, n = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        n += 1
    _sync(engine.runner.device)
    return 1e3 * (time.perf_counter() - t) / max(n, 1)


def replay_launch_us(engine: Engine, ids: list[list[int]], new: int) -> float:
    """Host microseconds per decode-graph replay call (buffer upload + graph launches, no
    sync): what the GPU waits for at the start of every decode step. 0 without graphs."""
    g = engine.runner.graphs
    if g is None or g.failed:
        return 0.0
    acc = []
    replay = g.replay

    def timed(*a, **k):
        t = time.perf_counter()
        out = replay(*a, **k)
        acc.append(time.perf_counter() - t)
        return out

    g.replay = timed
    try:
        add_requests(engine, ids, new)
        finish(engine)
    finally:
        del g.replay
    acc = sorted(acc)
    return 1e6 * acc[len(acc) // 2] if acc else 0.0


def profile(out_dir: str, model_name: str = "qwen3-0.6b", batch: int = 64, plen: int = 128, new: int = 64,
            modes: tuple[str, ...] = ("invariant", "fast")) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda:  # host overhead only: a tiny model in fp32
        model_name = "tiny"
    model = build(model_name, "cuda" if cuda else "cpu")
    if not cuda:
        model = model.float()
    ids = prompts(batch, plen, model.args.vocab_size, seed=0)
    report = {}
    for mode in modes:
        with mk.use_mode(mode):
            t = time.perf_counter()
            eng = Engine(model, config=EngineConfig(page_size=64, kv_memory_fraction=0.5, max_model_len=4096,
                                                    kv_memory_bytes=0 if cuda else 1 << 28), kernel_mode=mode)
            init_s = time.perf_counter() - t
            run_engine(eng, prompts(8, 64, 1000, seed=12345), 8)
            decode_step_ms(eng, ids, new)  # once at this batch first: kernels specialized for it compile here
            step_ms = decode_step_ms(eng, ids, new)
            eng.config.overlap_schedule = False  # the phases are timed one after another
            step_ms_sync = decode_step_ms(eng, ids, new)
            phases = phase_times(eng, ids, new)
            eng.config.overlap_schedule = True
            if not cuda:
                report[mode] = dict(step_ms=step_ms, step_ms_no_overlap=step_ms_sync, tok_s=batch / step_ms * 1e3,
                                    phases_ms=phases)
                print(mode, json.dumps(report[mode], indent=1), flush=True)
                continue
            launch_us = replay_launch_us(eng, ids, new)
            pre = prefill_profile(eng, batch, plen, model.args.vocab_size, new)
            from torch.profiler import ProfilerActivity, profile as tprof
            prefill(eng, ids, 24)
            with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                n = 0
                while eng.has_unfinished() and n < 16:
                    eng.step()
                    n += 1
                torch.cuda.synchronize()
            finish(eng)
            events = prof.key_averages()
            table = events.table(sort_by="cuda_time_total", row_limit=40)
            cuda_us = sum(e.self_device_time_total for e in events)
            by_kernel = sorted((e for e in events if e.self_device_time_total > 0),
                               key=lambda e: -e.self_device_time_total)
            trace = os.path.join(out_dir, f"trace_{mode}.json")
            prof.export_chrome_trace(trace)
            with open(os.path.join(out_dir, f"profile_{mode}.txt"), "w") as f:
                f.write(f"{n} decode steps, batch {batch}, prompt {plen}\n{table}\n")
            report[mode] = dict(step_ms=step_ms, step_ms_no_overlap=step_ms_sync, init_s=init_s,
                                gpu_ms_per_step=cuda_us / 1e3 / n,
                                tok_s=batch / step_ms * 1e3, phases_ms=phases, replay_launch_us=launch_us,
                                kernels_us_per_step={  # kernel: [GPU us, calls] a step
                                    e.key: [round(e.self_device_time_total / n, 2), round(e.count / n, 2)]
                                    for e in by_kernel[:30]}, **pre)
            print(mode, json.dumps(report[mode], indent=1), flush=True)
            del eng
            gc.collect()
            torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sweep")
    ap.add_argument("--out", default="bench_engine.json", help="JSON results file")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip rows once this much time has passed")
    ap.add_argument("--kv-fraction", type=float, default=0.85, help="EngineConfig.kv_memory_fraction")
    ap.add_argument("--graph-by-width", action="store_true", help="EngineConfig.cuda_graph_by_width")
    ap.add_argument("--prefill-tokens", type=int, default=0,
                    help="EngineConfig.max_prefill_tokens (0: the engine's choice, 16384 where it fits on an H200)")
    ap.add_argument("--only", default="", help="comma-separated systems to run (e.g. engine)")
    ap.add_argument("--no-warm", action="store_true", help="skip the second run (graphs captured, new prompts)")
    ap.add_argument("--profile", metavar="DIR", help="only profile decode steps and one prefill; write DIR/profile*")
    ap.add_argument("--profile-model", default="qwen3-0.6b", choices=sorted(SHAPES), help="--profile: model shape")
    ap.add_argument("--profile-new", type=int, default=64, help="--profile: new tokens per sample")
    ap.add_argument("--profile-batch", type=int, default=64, help="--profile: batch size")
    ap.add_argument("--profile-prompt", type=int, default=128, help="--profile: prompt tokens per sample")
    ap.add_argument("--profile-modes", default="invariant,fast", help="--profile: comma-separated modes")
    a = ap.parse_args()
    if a.profile:
        return profile(a.profile, model_name=a.profile_model, batch=a.profile_batch, plen=a.profile_prompt, new=a.profile_new,
                       modes=tuple(a.profile_modes.split(",")))
    if not torch.cuda.is_available():
        raise SystemExit("tools/bench/engine.py needs a CUDA device (--profile also runs on CPU)")
    t0, bw, peak = time.perf_counter(), hbm_bandwidth(), matmul_peak()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, host=platform.node(),
                date=time.strftime("%Y-%m-%d"), hbm_gb_s=bw / 1e9, matmul_tflops=peak / 1e12, quick=a.quick,
                prefill_tokens_arg=a.prefill_tokens)
    results = []
    rows = plan(a.quick)
    if a.only:
        rows = [r for r in rows if r[1] in a.only.split(",")]
    for model_name in SHAPES:
        model = build(model_name)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        engines: dict[str, Engine] = {}
        for i, (m, system, batch, plen, new) in enumerate(rows):
            if m != model_name:
                continue
            row = dict(model=m, system=system, batch=batch, prompt=plen, new=new)
            row["roofline_tok_s"] = roofline_tok_s(model.args, weight_bytes, bw, batch, plen, new)
            row["prefill_roofline_tok_s"] = prefill_roofline_tok_s(model.args, row["roofline_tok_s"], peak, batch,
                                                                   plen, new)
            if time.perf_counter() - t0 > a.budget_s:
                results.append({**row, "skipped": "time budget"})
                continue
            ids = prompts(batch, plen, model.args.vocab_size, seed=i)
            try:
                if system.startswith("engine"):
                    mode = "fast" if system == "engine-fast" else "invariant"
                    with mk.use_mode(mode):
                        if system not in engines:
                            engines.clear()
                            gc.collect()
                            torch.cuda.empty_cache()
                            engines[system] = Engine(model, config=EngineConfig(
                                page_size=64, kv_memory_fraction=a.kv_fraction, max_model_len=4096,
                                cuda_graph_by_width=a.graph_by_width, overlap_schedule=system != "engine-no-overlap",
                                max_prefill_tokens=a.prefill_tokens),
                                kernel_mode=mode)  # the engine runs its steps in its own mode, not the caller's
                            run_engine(engines[system], prompts(8, 64, 1000, seed=12345), 8)  # compile
                        row["max_prefill_tokens"] = engines[system].max_prefill_tokens
                        row.update(run_engine(engines[system], ids, new))
                        if not a.no_warm:  # again, decode graphs now captured; new prompts (no prefix-cache hits)
                            fresh = prompts(batch, plen, model.args.vocab_size, seed=i + 1000)
                            warm = run_engine(engines[system], fresh, new)
                            warm_s, row["warm_alloc_retries"] = warm["wall_s"], warm["alloc_retries"]
                            row["warm_overlapped"] = warm["overlapped"]  # decode steps launched ahead
                            row["warm_gc_ms"], row["warm_gc_runs"] = warm["gc_ms"], warm["gc_runs"]
                            row["warm_clock"] = warm["clock"]  # mean SM MHz and W (None without nvidia-smi)
                            first = prompts(batch, plen, model.args.vocab_size, seed=i + 2000)
                            first_s = run_engine(engines[system], first, 1)["wall_s"] if new > 1 else None
                            row.update(warm_split(batch, new, warm_s, first_s))
                else:
                    engines.clear()
                    gc.collect()
                    torch.cuda.empty_cache()
                    hf = hf_model(m)
                    row.update(run_hf(hf, system, ids, new))
                    del hf
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the sweep
                traceback.print_exc()
                row["skipped"] = f"{type(e).__name__}: {str(e)[:160]}"
            if "wall_s" in row:
                row["output_tok_s"] = batch * new / row["wall_s"]
                row["pct_roofline"] = 100 * row["output_tok_s"] / row["roofline_tok_s"]
                row["pct_prefill_roofline"] = 100 * row["output_tok_s"] / row["prefill_roofline_tok_s"]
            results.append(row)
            print_row(row)
        engines.clear()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    for line in vs_peers(results):
        print(line)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"\n{meta['device']}, HBM {meta['hbm_gb_s']:.0f} GB/s, {time.perf_counter() - t0:.0f} s; wrote {a.out}")


def warm_split(batch: int, new: int, warm_s: float, first_s: float | None) -> dict:
    """The warm run's tok/s and, given a run of the same shape to the first token only (prefill + one
    sampling step), its split: that run's ms, then ms per decode step over the other new - 1 tokens."""
    out = dict(warm_tok_s=batch * new / warm_s)
    if first_s is not None and new > 1:
        out.update(warm_first_ms=1e3 * first_s, warm_decode_ms=1e3 * (warm_s - first_s) / (new - 1))
    return out


def vs_peers(results: list[dict]) -> list[str]:
    """Each engine row's speed over the transformers rows of its model, batch, prompt and new tokens
    (the issue's ">= 40x generate" is read here): the warm run where there is one, else the cold. Sets
    row["vs_" + peer] and returns one line a pair."""
    lines = []
    for r in results:
        ours = r.get("warm_tok_s", r.get("output_tok_s"))
        if not r["system"].startswith("engine") or ours is None:
            continue
        for p in results:
            same = all(p[k] == r[k] for k in ("model", "batch", "prompt", "new"))
            if same and p["system"].startswith("hf-") and p.get("output_tok_s"):
                r["vs_" + p["system"]] = ours / p["output_tok_s"]
                lines.append(f"{r['model']} b{r['batch']} p{r['prompt']}: {r['system']} "
                             f"({'warm' if 'warm_tok_s' in r else 'cold'}) {ours:.0f} tok/s = "
                             f"{r['vs_' + p['system']]:.1f}x {p['system']} ({p['output_tok_s']:.0f} tok/s)")
    return lines


def print_row(r: dict) -> None:
    if not hasattr(print_row, "header"):
        print_row.header = True
        print(f"{'model':<11} {'system':<18} {'batch':>5} {'prompt':>6} {'new':>5} {'wall s':>7} "
              f"{'out tok/s':>9} {'roofline':>9} {'%':>5}  note")
    wall = f"{r['wall_s']:7.1f}" if "wall_s" in r else f"{'-':>7}"
    tps = f"{r['output_tok_s']:9.0f}" if "output_tok_s" in r else f"{'-':>9}"
    pct = f"{r['pct_roofline']:5.1f}" if "pct_roofline" in r else f"{'-':>5}"
    note = r.get("skipped", f"preempt {r['preemptions']}" if "preemptions" in r else "")
    if r.get("alloc_retries") or r.get("warm_alloc_retries"):
        note += f"; allocator retries {r['alloc_retries']} cold, {r.get('warm_alloc_retries', 0)} warm"
    if "warm_tok_s" in r:
        note += (f"; warm {r['warm_tok_s']:.0f} tok/s = {100 * r['warm_tok_s'] / r['roofline_tok_s']:.1f}%"
                 f" ({100 * r['warm_tok_s'] / r['prefill_roofline_tok_s']:.1f}% with prefill)")
        if "warm_decode_ms" in r:
            note += f": prefill + first token {r['warm_first_ms']:.1f} ms, then {r['warm_decode_ms']:.3f} ms a step"
        if "warm_overlapped" in r:
            note += f" ({r['warm_overlapped']} launched ahead; GC {r['warm_gc_runs']} runs, {r['warm_gc_ms']:.1f} ms"
            clock = r.get("warm_clock")
            note += f"; SM {clock['sm_mhz']:.0f} MHz, {clock['power_w']:.0f} W)" if clock else ")"
    elif "pct_prefill_roofline" in r:
        note += f"; {r['pct_prefill_roofline']:.1f}% with prefill"
    if "max_prefill_tokens" in r:
        note += f"; prefill {r['max_prefill_tokens']} tokens a step"
    print(f"{r['model']:<11} {r['system']:<18} {r['batch']:>5} {r['prompt']:>6} {r['new']:>5} {wall} {tps} "
          f"{r['roofline_tok_s']:9.0f} {pct}  {note}", flush=True)


if __name__ == "__main__":
    main()
