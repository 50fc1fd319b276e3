"""Trainer throughput: tokens/s and MFU of a Qwen3-0.6B-shaped model (random weights),
packed sequences at 4k and 16k tokens, invariant vs fast kernels.

    python tools/bench/train.py --out bench_train.json            # one GPU, no torchrun needed
    python tools/bench/train.py --logprobs fused unfused          # fused lm_head + logprobs vs not
    python tools/bench/train.py --model small --seqs 4096 --modes invariant --logprobs unfused  # CPU
    python tools/bench/train.py --seqs 4096 16384 --modes invariant --draft 0 1   # cost of the MTP draft
    python tools/bench/train.py --seqs 4096 16384 --peer          # + plain transformers, same run
    python tools/bench/train.py --seqs 4096 --peer --profile prof  # + one profiled step per case
    python tools/bench/train.py --seqs 16384 --modes invariant --host-profile 25  # + the host's Python, one step
    python tools/bench/train.py --seqs 4096 --units none model     # one rank without FSDP vs one FSDP unit
    python tools/bench/train.py --seqs 4096 --graphs off on        # the trunk eager vs from CUDA graphs
    python tools/bench/train.py --seqs 4096 16384 --one-pass off on  # torch's optimizer step vs the one pass
    python tools/bench/train.py --seqs 4096 16384 --interleave --steps 16  # fast vs invariant by turns, one trainer
    python tools/bench/train.py --seqs 4096 16384 --modes invariant --wait no yes --peer  # queued steps vs a sync each
    python tools/bench/train.py --model qwen3-0.6b qwen3-moe-a0.6b --seqs 4096 --modes invariant  # MoE vs dense MFU
    python tools/bench/train.py --model qwen3-moe-a0.6b --seqs 4096 --modes invariant --gluon-grouped  # Gluon experts
    torchrun --nproc-per-node 8 tools/bench/train.py --out b.json  # FSDP over 8 GPUs

Each case: `--warmup` untimed steps, then `--steps` timed train steps of one micro-batch of
`seq` tokens (one sequence, so attention is the full causal seq^2 / 2), queued one after another
(train_step_async, the metrics read after the last: tok/s of the wall time over them all) or
with `--wait yes` each waited for (train_step). Prints a table and writes JSON. MFU counts 6 * N * tokens (N excludes the embedding table and the draft).
`--draft N`: the model has N MTP draft modules trained beside the policy on the same forward
(train/draft.py); 0 = no draft. `--peer` also times what a user writes without us, on the
same shape, sequences and device: transformers' Qwen3ForCausalLM with SDPA attention, fp32
weights under bf16 autocast (on CUDA), its own loss, fused AdamW; the table gives each of
our rows as a ratio to the peer at the same length. `SM MHz`: the GPU's mean SM clock over the
timed steps (gpu_clock.py: at the power cap it moves between runs, and kernels' times with it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time

import torch

import dataclasses

import miles_kernels as mk
from gpu_clock import ClockSampler
from miles_fsdp.models import ModelArgs, Transformer
from miles_fsdp.observe.memory import reserved_memory_gib
from miles_fsdp.observe.profiler import ProfileConfig, StepProfiler
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.loss import sft_loss
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import PEAK_FLOPS, Trainer, TrainerConfig, _flop_params

QWEN3_0_6B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
    intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
)
# a CPU-sized model with a real vocabulary: the lm_head + logprobs memory shows at small cost
SMALL = {**QWEN3_0_6B, "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
# a Qwen3-MoE with the 0.6B's active parameters (8 of 64 experts of 384 = one 3072-wide MLP):
# the "MoE MFU >= half the dense model's at equal active parameters" compares it with qwen3-0.6b
QWEN3_MOE_A0_6B = {**QWEN3_0_6B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                   "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 384, "norm_topk_prob": True,
                   "decoder_sparse_step": 1, "mlp_only_layers": []}
SMALL_MOE = {**SMALL, **{k: QWEN3_MOE_A0_6B[k] for k in ("architectures", "model_type", "norm_topk_prob",
                                                          "decoder_sparse_step", "mlp_only_layers")},
             "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256}  # small's active params
TINY = {**SMALL, "vocab_size": 2048}  # small's layers with a short vocabulary: CPU smoke runs under the interpreter
MODELS = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-moe-a0.6b": QWEN3_MOE_A0_6B, "small": SMALL, "small-moe": SMALL_MOE,
          "tiny": TINY}
DENSE_OF = {"qwen3-moe-a0.6b": "qwen3-0.6b", "small-moe": "small"}  # the MoE MFU / dense MFU pairs


def _trainer(seq: int, ac: bool, peak_flops: float, model_name: str, fused: bool, n_mtp: int, units: str,
             graphs: bool | None, one_pass: bool | None) -> tuple[Trainer, list, str]:
    """(the case's trainer, its one sequence of seq tokens, its units column)."""
    hf = MODELS[model_name]
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(ModelArgs.from_hf(hf), n_mtp=n_mtp))
    model.init_weights(seed=0)
    parallel = ParallelConfig(param_dtype="auto", activation_checkpointing=ac, fsdp_units=units)
    cfg = TrainerConfig(optim=OptimConfig(lr=1e-5, one_pass=one_pass), max_tokens_per_micro_batch=seq, peak_flops=peak_flops,
                        fused_logprobs=fused, cuda_graphs=graphs, parallel=parallel)
    trainer = Trainer(model, cfg, draft=DraftConfig() if n_mtp else None)
    name = units + ("+graphs" if trainer.graphs is not None else "")  # graphs=None: the trainer's default
    g = torch.Generator().manual_seed(0)
    return trainer, [TrainSeq(torch.randint(0, hf["vocab_size"], (seq,), generator=g).tolist())], name


def _summary(rows: list[dict], wall: float | None = None) -> dict:
    """tokens/s, MFU and step time over the rows: of `wall` seconds for them all where given, else
    of their own step times (the device queue's, train/pending.py)."""
    total = sum(r["time/train_step_s"] for r in rows) if wall is None else wall
    tokens = sum(r["train/tokens"] for r in rows)
    flops_s = sum(r.get("perf/mfu", 0.0) * r["time/train_step_s"] for r in rows)  # MFU x seconds
    return {"tokens_per_s": tokens / total, "mfu": flops_s / total,
            "step_s": total / len(rows), "device_step_s": sum(r["time/train_step_s"] for r in rows) / len(rows),
            "peak_mem_gib": max(r["perf/peak_mem_gib"] for r in rows),
            "reserved_gib": max(r.get("perf/reserved_gib", 0.0) for r in rows), "loss": rows[-1]["train/loss"]}


def _steps(trainer: Trainer, seqs: list, modes: list[str], wait: bool) -> tuple[list[dict], float]:
    """One train step a mode in `modes`, in order: each waited for (train_step: the host syncs at every
    step's end, as a loop that reads each step's loss at once does) or all queued (train_step_async,
    the metrics read after the last is queued, as the SFT loop does); (their metrics, the wall seconds)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = []
    for m in modes:
        with mk.use_mode(m):
            step = trainer.train_step if wait else trainer.train_step_async
            out.append(step(trainer.pack(seqs), sft_loss, ScoringSpec(kernel_mode=m)))
    out = [r if wait else r.result() for r in out]
    return out, time.perf_counter() - t


def run_interleaved(seq: int, modes: list[str], steps: int, warmup: int, ac: bool, peak_flops: float,
                    model_name: str = "qwen3-0.6b", fused: bool = True, n_mtp: int = 0, units: str = "auto",
                    graphs: bool | None = None, one_pass: bool | None = None, wait: bool = False) -> list[dict]:
    """One trainer, its steps taken in the modes by rounds, the order reversed every other round
    (invariant, fast, fast, invariant, ...): the modes see the same clock and power state, which
    moves between separate cases by a few percent, and each goes first as often (the mode second in
    a round ran ~2% slower in either order: H100, 2026-12-05). One row per mode, its rates of its
    own step times (the device queue's); `vs_first` is its speed over the first mode's, from the
    same rounds (paired_ratio; > 1: faster)."""
    trainer, seqs, name = _trainer(seq, ac, peak_flops, model_name, fused, n_mtp, units, graphs, one_pass)
    _steps(trainer, seqs, modes * warmup, wait)
    order = [m for r in range(steps) for m in (modes if r % 2 == 0 else modes[::-1])]
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    with ClockSampler() as clock:
        done, _ = _steps(trainer, seqs, order, wait)
    for m, r in zip(order, done):
        rows[m].append(r)
    one_pass_used = trainer.one_pass
    del trainer
    _release()
    first = rows[modes[0]]
    out = []
    for m in modes:
        out.append({"seq": seq, "mode": m, "ac": ac, "model": model_name, "fused_logprobs": fused, "draft": n_mtp,
                    "units": name, "optim": "one pass" if one_pass_used else "torch", "interleaved": True, "wait": wait,
                    **_summary(rows[m]), "vs_first": paired_ratio(first, rows[m]), **_clock(clock)})
    return out


def paired_ratio(first: list[dict], other: list[dict]) -> float:
    """The median over pairs of rounds (one in each order) of the geometric mean of the pair's step
    time ratios, first / other: a cost of going second in a round cancels within each pair. One
    round: its ratio; an odd last round is left out."""
    ratios = [a["time/train_step_s"] / b["time/train_step_s"] for a, b in zip(first, other)]
    pairs = [math.sqrt(a * b) for a, b in zip(ratios[0::2], ratios[1::2])] or ratios[:1]
    return statistics.median(pairs)


def run_case(seq: int, mode: str, steps: int, warmup: int, ac: bool, peak_flops: float, model_name: str = "qwen3-0.6b",
             fused: bool = True, n_mtp: int = 0, profile: str = "", units: str = "auto", graphs: bool | None = None,
             host_profile: int = 0, one_pass: bool | None = None, wait: bool = False) -> dict:
    trainer, seqs, name = _trainer(seq, ac, peak_flops, model_name, fused, n_mtp, units, graphs, one_pass)
    spec = ScoringSpec(kernel_mode=mode)  # the trainer's forward runs in the spec's mode
    _steps(trainer, seqs, [mode] * warmup, wait)
    with ClockSampler() as clock:
        rows, wall = _steps(trainer, seqs, [mode] * steps, wait)
    with mk.use_mode(mode):
        if profile:  # one more step under torch.profiler, not timed
            case = f"train_{model_name}_{seq}_{mode}_draft{n_mtp}_{name}" + ("_wait" if wait else "")
            cfg = ProfileConfig(steps=(1,), dir=os.path.join(profile, case))
            with StepProfiler(cfg, profile)(1):
                trainer.train_step(trainer.pack(seqs), sft_loss, spec)
            print_profile_head(os.path.join(cfg.dir, "step_00001_rank0.txt"), os.path.basename(cfg.dir))
        if host_profile:  # one more step under cProfile: where the host's time goes (syncs show as waits)
            print_host_profile(lambda: trainer.train_step(trainer.pack(seqs), sft_loss, spec), host_profile)
    trainer_one_pass = trainer.one_pass
    del trainer
    _release()
    return {"seq": seq, "mode": mode, "ac": ac, "model": model_name, "fused_logprobs": fused, "draft": n_mtp,
            "units": name, "optim": "one pass" if trainer_one_pass else "torch", "wait": wait, **_summary(rows, wall),
            **_clock(clock)}


def _clock(clock: ClockSampler) -> dict:
    """The timed steps' mean SM clock and power (gpu_clock.py), where nvidia-smi gave them."""
    return {"sm_mhz": clock.result["sm_mhz"], "power_w": clock.result["power_w"]} if clock.result else {}


def print_profile_head(path: str, case: str, lines: int = 12) -> None:
    """The profiled step's wall, device busy / span and longest idle gaps (its .txt's head), so
    the log holds every case's without the profile folder."""
    if os.path.exists(path):
        with open(path) as f:
            print(f"profile of {case} ({path}):\n" + "".join(f.readlines()[:lines]), flush=True)


def print_host_profile(step, top: int) -> None:
    """Run step() under cProfile; print the top functions by cumulative and by own time."""
    import cProfile
    import pstats

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.runcall(step)
    for key in ("cumulative", "tottime"):
        print(f"host profile of one step, top {top} by {key}:")
        pstats.Stats(prof).sort_stats(key).print_stats(top)


def _release() -> None:
    """Give the next case an empty allocator (graphs hold their pools until collected)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_peer(seq: int, steps: int, warmup: int, model_name: str = "qwen3-0.6b", profile: str = "",
             peak_flops: float = 0.0, wait: bool = False) -> dict:
    """Plain transformers training steps (the peer): tokens/s and peak memory. wait: a sync after
    every step (each step's time); else the steps queued one after another (no read of the loss
    between them) and timed together."""
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    hf = {k: v for k, v in MODELS[model_name].items() if k != "architectures"}
    moe = hf["model_type"] == "qwen3_moe"
    config_cls = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
    model_cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    cfg = config_cls(**{k: v for k, v in hf.items() if k != "model_type"}, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = model_cls(cfg).to(dev, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (1, seq), generator=g).to(dev)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    with ClockSampler() as clock:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            loss = step()
            if cuda and wait:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    if profile:
        where = os.path.join(profile, f"train_{model_name}_{seq}_peer" + ("_wait" if wait else ""))
        with StepProfiler(ProfileConfig(steps=(1,), dir=where), profile)(1):
            step()
        print_profile_head(os.path.join(where, "step_00001_rank0.txt"), os.path.basename(where))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    reserved = reserved_memory_gib(dev) or 0.0  # the whole run's peak reserve (graph pools included for ours)
    del model, opt
    _release()
    step = sum(times) / len(times) if wait else wall / steps  # queued: the loop's wall over its steps
    with torch.device("meta"):  # the peer's MFU counts our model's active parameters (the same shape)
        n_flop = _flop_params(Transformer(ModelArgs.from_hf(MODELS[model_name])))
    if not peak_flops and cuda:
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), 0.0)
    return {"seq": seq, "mode": "peer", "ac": False, "model": model_name, "fused_logprobs": False, "draft": 0,
            "units": "-", "wait": wait, "tokens_per_s": seq / step,
            "mfu": 6 * n_flop * seq / step / peak_flops if peak_flops else 0.0, "step_s": step, "peak_mem_gib": peak,
            "reserved_gib": reserved, "loss": float(loss), **_clock(clock)}


def _case(a, model: str, seq: int, modes, lp: str, d: int, u: str, gr: str, op: str, wait: bool) -> list[dict]:
    """One case's rows (a row per mode where --interleave); an OOM is recorded as the case's row."""
    flag = {"auto": None, "on": True, "off": False}
    try:
        if a.interleave:
            return run_interleaved(seq, modes, a.steps, a.warmup, a.ac, a.peak_flops, model, lp == "fused", d, u,
                                   flag[gr], flag[op], wait)
        return [run_case(seq, modes, a.steps, a.warmup, a.ac, a.peak_flops, model, lp == "fused", d, a.profile, u,
                         flag[gr], a.host_profile, flag[op], wait)]
    except torch.OutOfMemoryError as e:  # record the case, keep measuring the others
        torch.cuda.empty_cache()
        return [{"seq": seq, "mode": "/".join(modes) if a.interleave else modes, "ac": a.ac, "model": model,
                 "fused_logprobs": lp == "fused", "draft": d, "wait": wait,
                 "units": u + {"auto": "", "on": "+graphs", "off": "-graphs"}[gr], "error": f"OOM: {str(e).splitlines()[0]}"}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--modes", nargs="+", default=["invariant", "fast"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (host-bound steps vary: 5 or more)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--peak-flops", type=float, default=0.0, help="per-GPU peak FLOP/s (0: look up H100/H200)")
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["qwen3-0.6b"],
                   help="one case set per model; small: 2 layers, d 256, vocab 32k (CPU-sized); qwen3-moe-a0.6b: "
                        "64 experts top-8 with qwen3-0.6b's active parameters, small-moe: 8 top-2 with small's (the "
                        "table adds MoE MFU / dense MFU where both run)")
    p.add_argument("--logprobs", nargs="+", choices=["fused", "unfused"], default=["fused"],
                   help="TrainerConfig.fused_logprobs (CPU peak memory is per process: one value per run there)")
    p.add_argument("--draft", type=int, nargs="+", default=[0],
                   help="MTP draft modules trained beside the policy (0 = none); one case per value")
    p.add_argument("--units", nargs="+", default=["auto"], choices=["auto", "none", "model", "block"],
                   help="ParallelConfig.fsdp_units; one case per value (none: one rank, no FSDP)")
    p.add_argument("--graphs", nargs="+", default=["auto"], choices=["auto", "off", "on"],
                   help="TrainerConfig.cuda_graphs (the trunk from CUDA graphs; auto: the default, on where "
                        "they can run); one case per value")
    p.add_argument("--one-pass", nargs="+", default=["auto"], choices=["auto", "off", "on"],
                   help="OptimConfig.one_pass (the optimizer step as one pass over the bf16 grads; auto: the "
                        "default, on where it applies)")
    p.add_argument("--peer", action="store_true",
                   help="also time plain transformers (SDPA, fp32 weights + bf16 autocast, fused AdamW)")
    p.add_argument("--profile", metavar="DIR", default="",
                   help="also profile one extra step per case (torch.profiler): DIR/train_MODEL_SEQ_MODE*/step_*.txt/.json")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also run one step per case under cProfile and print its top N functions")
    p.add_argument("--gluon-grouped", action="store_true",
                   help="the MoE experts' grouped_linear by the Gluon kernel on Hopper (miles_kernels matmul.GLUON_GROUPED)")
    p.add_argument("--interleave", action="store_true",
                   help="one trainer per case, its steps in --modes by turns, the order reversed every other round "
                        "(the modes compared in one clock state, each first as often)")
    p.add_argument("--wait", nargs="+", default=["no"], choices=["no", "yes"],
                   help="yes: a host sync at every step's end (train_step; the peer synchronizes); no: the steps "
                        "queued (train_step_async, as the SFT loop runs them; the peer's loop unsynced); one case "
                        "per value, the peer too")
    p.add_argument("--out", default="bench_train.json")
    a = p.parse_args()
    if a.gluon_grouped:
        from miles_kernels._triton import matmul

        matmul.GLUON_GROUPED = True
    import torch.distributed as dist

    t0 = time.time()
    results = []
    for model in a.model:
        for s in a.seqs:
            for w in (x == "yes" for x in a.wait):
                for m in ([a.modes] if a.interleave else a.modes):
                    for lp in a.logprobs:
                        for d in a.draft:
                            for u, gr, op in ((u, gr, op) for u in a.units for gr in a.graphs for op in a.one_pass):
                                results += _case(a, model, s, m, lp, d, u, gr, op, w)
                                print(results[-1], flush=True)
                if a.peer:
                    results.append(run_peer(s, a.steps, a.warmup, model, a.profile, a.peak_flops, w))
                    print(results[-1], flush=True)
    peer = {(r["model"], r["seq"], r["wait"]): r["tokens_per_s"] for r in results if r["mode"] == "peer"}
    mfu = {(r["model"], r["seq"], r["mode"], r["units"], r["wait"]): r["mfu"] for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            continue
        if (r["model"], r["seq"], r["wait"]) in peer:
            r["vs_peer"] = r["tokens_per_s"] / peer[r["model"], r["seq"], r["wait"]]
        dense = mfu.get((DENSE_OF.get(r["model"]), r["seq"], r["mode"], r["units"], r["wait"]))
        if dense:
            r["mfu_vs_dense"] = r["mfu"] / dense
    if dist.get_rank() == 0:
        print(f"{'model':>15} {'seq':>6} {'mode':>10} {'units':>11} {'optim':>8} {'logprobs':>9} {'draft':>5} {'wait':>4} "
              f"{'tok/s':>10} "
              f"{'MFU':>6} {'step s':>7} {'peak GiB':>9} {'resv GiB':>9} {'vs peer':>8} {'MFU/dense':>9} {'SM MHz':>6}")
        for r in results:
            lp = "fused" if r["fused_logprobs"] else "unfused"
            head = (f"{r['model']:>15} {r['seq']:>6} {r['mode']:>10} {r['units']:>11} {r.get('optim', '-'):>8} {lp:>9} "
                    f"{r['draft']:>5} {'yes' if r.get('wait') else 'no':>4}")
            if "error" in r:
                print(f"{head} {r['error']}")
                continue
            vs = f"{r['vs_peer']:>7.2f}x" if "vs_peer" in r else ""
            md = f"{r['mfu_vs_dense']:>8.2f}x" if "mfu_vs_dense" in r else ""
            mhz = f"{r['sm_mhz']:>6.0f}" if "sm_mhz" in r else f"{'-':>6}"
            print(f"{head} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} {r['step_s']:>7.2f} {r['peak_mem_gib']:>9.2f} "
                  f"{r.get('reserved_gib', 0.0):>9.2f} {vs:>8} {md:>9} {mhz}")
        for r in results:
            if r.get("interleaved") and r["mode"] != a.modes[0]:
                print(f"interleaved {r['model']} {r['seq']}: {r['mode']} / {a.modes[0]} speed, median over "
                      f"{max(a.steps // 2, 1)} pairs of rounds (one each order): {r['vs_first']:.3f}x")
        meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "world_size": dist.get_world_size(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "model": f"{', '.join(a.model)} shape, random weights",
                "gluon_grouped": a.gluon_grouped,
                "wall_s": time.time() - t0}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
