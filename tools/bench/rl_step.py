"""One RL step's phase breakdown for a Qwen3-0.6B-shaped model (random weights, one GPU).

    python tools/bench/rl_step.py --out bench_rl_step.json

The real loop's pieces (rl/rollout.generate, rl/train_data, rl/loss, Trainer.train_step, the engine's
update_weights from the trainer's PolicyWeights)
on synthetic prompts: `--prompts` prompts x `--n` samples, `--prompt-len` prompt tokens,
`--new` new tokens each (eos ignored, so every response has exactly `--new` tokens), a dense
random reward. Reports seconds per phase (generate, reward, train, sync), tokens/s and the
on-policy check (max |trainer - rollout| log-prob, 0.0 in invariant mode). Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train import QWEN3_0_6B  # noqa: E402  (the same model shape as the trainer benchmark)

import miles_kernels as mk  # noqa: E402
from miles_fsdp.data.sample import Sample  # noqa: E402
from miles_fsdp.engine.config import EngineConfig  # noqa: E402
from miles_fsdp.engine.engine import Engine  # noqa: E402
from miles_fsdp.engine.sequence import SamplingParams  # noqa: E402
from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.parallel import ParallelConfig  # noqa: E402
from miles_fsdp.rl.config import AlgoConfig  # noqa: E402
from miles_fsdp.rl.rollout import generate  # noqa: E402
from miles_fsdp.rl.loss import RLLoss  # noqa: E402
from miles_fsdp.rl.train_data import compute_advantages, to_train_seqs  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.scoring import ScoringSpec  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402
from miles_fsdp.train.weight_sync import PolicyWeights  # noqa: E402


CUDA = torch.cuda.is_available()
TINY = dict(QWEN3_0_6B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="RL steps (the first is warmup)")
    p.add_argument("--mode", choices=mk.MODES, default="invariant")
    p.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU smoke run")
    p.add_argument("--trainer-graphs", choices=["auto", "on", "off"], default="auto",
                   help="TrainerConfig.cuda_graphs (the trunk from CUDA graphs); auto: the default (on one GPU)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    spec = ScoringSpec(kernel_mode=a.mode)
    args = ModelArgs.from_hf(TINY if a.tiny else QWEN3_0_6B)
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    with torch.device("meta"):
        policy = Transformer(args)
    policy.init_weights(seed=0)
    trainer = Trainer(policy, TrainerConfig(optim=OptimConfig(lr=1e-6), max_tokens_per_micro_batch=8192,
                                            parallel=ParallelConfig(param_dtype="auto"),
                                            cuda_graphs={"auto": None, "on": True, "off": False}[a.trainer_graphs]))
    with torch.device("meta"):
        replica = Transformer(args)
    replica.init_weights(seed=0, device=device)
    kv = EngineConfig(kv_memory_fraction=0.2) if CUDA else EngineConfig(kv_memory_bytes=256 << 20, cuda_graphs=False)
    engine = Engine(replica.to(dtype).eval(), None, kv, eos_token_ids=[], kernel_mode=a.mode)
    weights = PolicyWeights(trainer.model, dtype)
    engine.update_weights(weights, version=0)  # the engine starts from the trainer's weights
    rng = random.Random(0)
    algo = AlgoConfig()
    rows = []
    for step in range(a.steps):
        prompts = [Sample(prompt="", prompt_ids=[rng.randrange(10, args.vocab_size) for _ in range(a.prompt_len)])
                   for _ in range(a.prompts)]

        def params(i):
            return SamplingParams(n=a.n, max_new_tokens=a.new, ignore_eos=True, seed=step * 100003 + i)

        samples, t_gen = timed(lambda: generate(engine, None, prompts, a.n, params))
        t0 = time.perf_counter()
        for s in samples:  # dense synthetic reward: fraction of even token ids
            s.reward = sum(t % 2 == 0 for t in s.response_ids) / len(s.response_ids)
        t_reward = time.perf_counter() - t0
        adv = compute_advantages(samples, a.n, algo)
        loss = RLLoss(algo, spec)
        m, t_train = timed(lambda: trainer.train_step(trainer.pack(to_train_seqs(samples, adv)), loss, spec,
                                                      entropy=True))
        _, t_sync = timed(lambda: engine.update_weights(weights, version=step + 1))
        gen_tokens = sum(s.response_length for s in samples)
        rows.append({"step": step, "generate_s": t_gen, "reward_s": t_reward, "train_s": t_train, "sync_s": t_sync,
                     "total_s": t_gen + t_reward + t_train + t_sync, "gen_tokens": gen_tokens,
                     "gen_tok_s": gen_tokens / t_gen, "train_tok_s": m["perf/tokens_per_s"],
                     "mfu": m.get("perf/mfu", 0.0), "logprob_abs_diff_max": float(loss.diff_max),
                     "peak_mem_gib": m["perf/peak_mem_gib"], **engine.metrics()})
    timed_rows = rows[1:] or rows
    mean = {k: sum(r[k] for r in timed_rows) / len(timed_rows) for k in rows[0] if k != "step"}
    e = rows[-1]
    print(f"{'phase':<10} {'seconds':>9}   ({a.prompts} prompts x {a.n} samples, {a.prompt_len}+{a.new} tokens,"
          f" mode {a.mode})")
    for k in ("generate_s", "reward_s", "train_s", "sync_s", "total_s"):
        print(f"{k[:-2]:<10} {mean[k]:>9.2f}")
    print(f"rollout {mean['gen_tok_s']:.0f} tok/s, train {mean['train_tok_s']:.0f} tok/s (MFU {mean['mfu']:.1%}), "
          f"logprob diff max {max(r['logprob_abs_diff_max'] for r in rows)}")
    print(f"engine: {e['engine/preemptions_total']:.0f} preemptions in {a.steps} steps, "
          f"decode from CUDA graphs: {e.get('engine/cuda_graphs_active', 0.0) == 1.0} "
          f"({e.get('engine/overlap_steps_total', 0.0):.0f} steps overlapped); trainer trunk from CUDA "
          f"graphs: {trainer.graphs is not None and not trainer.graphs.failed}")
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if CUDA else "cpu", "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "args": vars(a), "mean": mean, "steps": rows}, f, indent=2)


if __name__ == "__main__":
    main()
