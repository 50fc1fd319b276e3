"""Speculative decoding with the MTP draft: rollout tokens/s at batch 1, 16 and 64 with no
speculation, a frozen draft and the online draft, while RL moves the policy (one GPU).

    python tools/bench/spec.py --out bench_spec.json               # Qwen3-0.6B shape
    python tools/bench/spec.py --tiny --out /tmp/bench_spec.json   # CPU smoke run

1. corpus   token sequences of a random Markov chain over --states token ids: each state
            has a favourite successor, taken with probability --p-follow, else one of
            --fanout others. A policy trained on it is far from uniform (random weights
            would give acceptance near 0).
2. pretrain the policy (Qwen3-0.6B shape, 151,936 vocab) and a one-module MTP draft train on
            the corpus together (SFT loss and the draft's loss on the same forward). The
            draft at the end of this phase is the frozen draft.
3. RL       GRPO steps (the real pieces: rollout.generate, train_data, RLLoss, Trainer,
            update_weights) rewarding the transitions of a second successor (`Chain.alt`, one
            of the corpus's rare ones), so the policy moves away from the corpus the frozen
            draft learned; the trainer trains the draft online on each rollout batch.
4. measure  at RL step 0 and every --measure-every steps: the same requests (temperature
            1, --new tokens, eos ignored) at each batch size through an engine without
            speculation and one speculating --k tokens with the frozen, then the online
            draft. Outputs must be identical in all three (else the script fails).

Prints a table and writes JSON (speedups over no speculation, mean accepted length,
acceptance per draft position, the online draft's gain over the frozen one).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from rl_step import TINY  # noqa: E402
from train import QWEN3_0_6B  # noqa: E402

from miles_fsdp.data.sample import Sample  # noqa: E402
from miles_fsdp.engine.config import EngineConfig  # noqa: E402
from miles_fsdp.engine.engine import Engine  # noqa: E402
from miles_fsdp.engine.sequence import Request, SamplingParams  # noqa: E402
from miles_fsdp.engine.spec_compare import timed_outputs  # noqa: E402
from miles_fsdp.models import ModelArgs, Transformer  # noqa: E402
from miles_fsdp.parallel import ParallelConfig  # noqa: E402
from miles_fsdp.rl.config import AlgoConfig  # noqa: E402
from miles_fsdp.rl.loss import RLLoss  # noqa: E402
from miles_fsdp.rl.rollout import generate  # noqa: E402
from miles_fsdp.rl.train_data import compute_advantages, to_train_seqs  # noqa: E402
from miles_fsdp.train.draft import DraftConfig  # noqa: E402
from miles_fsdp.train.loss import sft_loss  # noqa: E402
from miles_fsdp.train.optim import OptimConfig  # noqa: E402
from miles_fsdp.train.packing import TrainSeq  # noqa: E402
from miles_fsdp.train.scoring import ScoringSpec  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402
from miles_fsdp.train.weight_sync import PolicyWeights  # noqa: E402

CUDA = torch.cuda.is_available()


class Chain:
    """A random Markov chain over `states` token ids (ids from 10 on: clear of specials)."""

    def __init__(self, states: int, vocab: int, p_follow: float, fanout: int, seed: int = 0):
        rng = random.Random(seed)
        self.ids = rng.sample(range(10, vocab), states)
        self.next = {s: [rng.choice(self.ids) for _ in range(fanout + 1)] for s in self.ids}
        self.alt = {s: succ[1] for s, succ in self.next.items()}  # the successor RL rewards
        self.p_follow, self.rng = p_follow, rng

    def alt_rate(self, prev: int, ids: list[int]) -> float:
        """The fraction of transitions in prev, ids... that take the rewarded successor."""
        seq = [prev, *ids]
        return sum(self.alt.get(a) == b for a, b in zip(seq, seq[1:])) / max(1, len(ids))

    def walk(self, n: int) -> list[int]:
        out = [self.rng.choice(self.ids)]
        while len(out) < n:
            succ = self.next[out[-1]]
            out.append(succ[0] if self.rng.random() < self.p_follow else self.rng.choice(succ[1:]))
        return out


def set_lr(trainer: Trainer, lr: float) -> None:
    """A new base LR for the policy's constant schedule (the draft keeps its own)."""
    trainer.scheduler.base_lrs = [lr] * len(trainer.scheduler.base_lrs)
    for g in trainer.optimizer.param_groups:
        g["lr"] = lr


def draft_weights(trainer: Trainer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trainer's draft (model.mtp), full tensors in the engine's dtype."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to(dtype).clone()
            for k, v in trainer.model.mtp.state_dict().items()}


def measure(engines: dict[str, Engine], frozen: dict, online: dict, chain: Chain, batch: int, a) -> dict:
    """One batch size: no speculation, the frozen draft, the online draft (same requests)."""
    reqs = [Request(chain.walk(a.prompt_len), SamplingParams(temperature=1.0, max_new_tokens=a.new, ignore_eos=True,
                                                             seed=1000 + i)) for i in range(batch)]
    runs = {}
    for name, engine, draft in (("none", engines["off"], None), ("frozen", engines["on"], frozen),
                                ("online", engines["on"], online)):
        if draft is not None:
            engine.model.mtp.load_state_dict(draft)
        runs[name] = timed_outputs(engine, reqs, a.repeats)
    want = runs["none"][0]
    for name in ("frozen", "online"):
        if runs[name][0] != want:
            raise SystemExit(f"batch {batch}: speculation with the {name} draft changed the outputs (a bug)")
    tokens = batch * a.new
    row = {"batch": batch, "tokens": tokens, "tok_s_none": tokens / runs["none"][1]}
    for name in ("frozen", "online"):
        _, secs, m = runs[name]
        row |= {f"tok_s_{name}": tokens / secs, f"speedup_{name}": runs["none"][1] / secs,
                f"accept_len_{name}": m.get("engine/spec_mean_accept_len", 1.0),
                f"accept_by_pos_{name}": [m[f"engine/spec_accept_rate_{i + 1}"] for i in range(a.k)
                                          if f"engine/spec_accept_rate_{i + 1}" in m]}
    row["online_over_frozen"] = row["tok_s_online"] / row["tok_s_frozen"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=3, help="draft tokens per step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--states", type=int, default=2048)
    p.add_argument("--p-follow", type=float, default=0.9)
    p.add_argument("--fanout", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=120)
    p.add_argument("--pretrain-batch", type=int, default=16, help="sequences of --seq-len per pretrain step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4, help="pretrain LR (policy and draft)")
    p.add_argument("--rl-steps", type=int, default=24)
    p.add_argument("--rl-lr", type=float, default=3e-4, help="the policy's LR in RL (high: the policy moves within the run)")
    p.add_argument("--draft-lr", type=float, default=3e-4, help="the online draft's LR in RL")
    p.add_argument("--prompts", type=int, default=16, help="RL prompts per step")
    p.add_argument("--n", type=int, default=8, help="RL samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=256, help="new tokens per sample in the measurements")
    p.add_argument("--rl-new", type=int, default=32,
                   help="new tokens per RL sample (short: a sequence's reward credits few transitions, the policy moves fast)")
    p.add_argument("--measure-every", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per measurement (the fastest counts)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short runs, for a CPU smoke run")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.tiny:
        a.states, a.pretrain_steps, a.pretrain_batch, a.seq_len, a.rl_steps = 64, 30, 8, 64, 2
        a.prompts, a.n, a.prompt_len, a.new, a.rl_new, a.measure_every, a.repeats = 4, 2, 8, 16, 8, 2, 1
        a.lr = a.rl_lr = a.draft_lr = 3e-3
        a.batches = [b for b in a.batches if b <= 16]
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    args = ModelArgs.from_hf(dict(TINY if a.tiny else QWEN3_0_6B, num_nextn_predict_layers=1))
    chain = Chain(a.states, args.vocab_size, a.p_follow, a.fanout)
    with torch.device("meta"):
        policy = Transformer(args)
    policy.init_weights(seed=0)
    optim = OptimConfig(lr=a.lr, warmup_steps=min(10, a.pretrain_steps // 5))
    trainer = Trainer(policy, TrainerConfig(optim=optim, max_tokens_per_micro_batch=8192,
                                            parallel=ParallelConfig(param_dtype="auto")),
                      draft=DraftConfig(optim=optim))
    t0 = time.perf_counter()
    for step in range(a.pretrain_steps):
        m = trainer.train_step(trainer.pack([TrainSeq(chain.walk(a.seq_len)) for _ in range(a.pretrain_batch)]),
                               sft_loss)
        if step % 25 == 0 or step == a.pretrain_steps - 1:
            print(f"pretrain {step}: loss {m['train/loss']:.3f} draft loss {m.get('draft/loss', float('nan')):.3f}",
                  flush=True)
    pretrain_s = time.perf_counter() - t0
    frozen = draft_weights(trainer, dtype)
    set_lr(trainer, a.rl_lr)
    for g in trainer.draft.optimizer.param_groups:
        g["lr"] = a.draft_lr
    trainer.draft.scheduler.base_lrs = [a.draft_lr] * len(trainer.draft.scheduler.base_lrs)

    kv = EngineConfig(kv_memory_bytes=(8 << 30) if CUDA else (256 << 20), cuda_graphs=CUDA)
    weights = PolicyWeights(trainer.model, dtype)
    engines = {}
    for name, k in (("off", 0), ("on", a.k)):
        with torch.device("meta"):
            replica = Transformer(args)
        replica.init_weights(seed=0, device=device)
        engines[name] = Engine(replica.to(dtype).eval(), None, dataclasses.replace(kv, num_speculative_tokens=k),
                               eos_token_ids=[])
        engines[name].update_weights(weights, version=0)
    algo, spec = AlgoConfig(), ScoringSpec()
    rows, rl = [], []
    for step in range(a.rl_steps + 1):
        if step % a.measure_every == 0 or step == a.rl_steps:
            online = draft_weights(trainer, dtype)
            for b in a.batches:
                rows.append({"rl_step": step, "reward": rl[-1]["reward"] if rl else None,
                             **measure(engines, frozen, online, chain, b, a)})
                r = rows[-1]
                print(f"rl step {step} batch {b}: none {r['tok_s_none']:.0f} tok/s, frozen {r['speedup_frozen']:.2f}x "
                      f"(accept len {r['accept_len_frozen']:.2f}), online {r['speedup_online']:.2f}x "
                      f"(accept len {r['accept_len_online']:.2f})", flush=True)
            engines["on"].model.mtp.load_state_dict(online)
        if step == a.rl_steps:
            break
        prompts = [Sample(prompt="", prompt_ids=chain.walk(a.prompt_len)) for _ in range(a.prompts)]
        params = lambda i, step=step: SamplingParams(n=a.n, max_new_tokens=a.rl_new, ignore_eos=True,  # noqa: E731
                                                     seed=step * 100003 + i)
        t1 = time.perf_counter()
        samples = generate(engines["on"], None, prompts, a.n, params)
        gen_s = time.perf_counter() - t1
        for s in samples:  # the policy moves towards the rewarded successors
            s.reward = chain.alt_rate(s.prompt_ids[-1], s.response_ids)
        loss = RLLoss(algo, spec)
        m = trainer.train_step(trainer.pack(to_train_seqs(samples, compute_advantages(samples, a.n, algo))), loss, spec)
        for e in engines.values():
            e.update_weights(weights, version=step + 1)
        rl.append({"step": step, "reward": sum(s.reward for s in samples) / len(samples), "rollout_s": gen_s,
                   "logprob_abs_diff_max": float(loss.diff_max), "draft_loss": m.get("draft/loss"),
                   **engines["on"].metrics()})
        print(f"rl step {step}: reward {rl[-1]['reward']:.3f} rollout {gen_s:.1f}s "
              f"accept len {rl[-1].get('engine/spec_mean_accept_len', 1.0):.2f}", flush=True)

    print(f"\n{'rl step':>7} {'reward':>6} {'batch':>5} {'none tok/s':>10} {'frozen':>7} {'online':>7} {'len fr':>6} {'len on':>6} "
          f"{'on/fr':>6}   (K={a.k}, speedup over no speculation; reward: the rewarded-successor rate so far)")
    for r in rows:
        rw = "" if r["reward"] is None else f"{r['reward']:.3f}"
        print(f"{r['rl_step']:>7} {rw:>6} {r['batch']:>5} {r['tok_s_none']:>10.0f} {r['speedup_frozen']:>6.2f}x "
              f"{r['speedup_online']:>6.2f}x {r['accept_len_frozen']:>6.2f} {r['accept_len_online']:>6.2f} "
              f"{r['online_over_frozen']:>5.2f}x")
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if CUDA else "cpu", "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "args": vars(a), "pretrain_s": pretrain_s, "rows": rows, "rl": rl},
                  f, indent=2)


if __name__ == "__main__":
    main()
