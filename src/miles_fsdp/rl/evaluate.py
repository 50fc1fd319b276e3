"""Held-out evaluation with the engine: mean reward, pass@1 and pass@k.

Each rank evaluates its slice of the prompts; the counts are summed over ranks, so the
numbers are those of the whole eval set. Greedy (temperature 0) with n = 1 gives accuracy.
An empty eval set is an error, not a reward of 0.0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from miles_fsdp.data.sample import Sample
from miles_fsdp.engine.sequence import SamplingParams
from miles_fsdp.errors import UserError
from miles_fsdp.parallel.reduce import all_reduce_sum
from miles_fsdp.rewards.registry import score_samples
from miles_fsdp.rl.eval_metrics import pass_at_k
from miles_fsdp.rl.rollout import generate, request_seed


class EmptyEvalSet(UserError, ValueError):
    """Nothing to evaluate: an empty set has no reward, so it must not report 0.0."""


def evaluate(engine, tokenizer, prompts: list[Sample], reward_fn, n: int, temperature: float,
             max_new_tokens: int, stop_strings: tuple[str, ...], seed: int, group=None) -> dict[str, float]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = prompts[rank::world]

    def params(i: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                              stop_strings=stop_strings, seed=request_seed(seed, rank + i * world))

    samples = generate(engine, tokenizer, mine, n, params) if mine else []
    report = score_samples(samples, reward_fn) if samples else None
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    correct = (rewards > 0.5).double()
    ks = sorted({1, n})
    sums = all_reduce_sum([float(rewards.sum()), len(samples), len(mine), sum(s.response_length for s in samples),
                           report.num_errors if report else 0]
                          + [pass_at_k(correct, n, k) * len(mine) if mine else 0.0 for k in ks], group)
    total, count, n_prompts, length, errors = sums[:5]
    if n_prompts == 0:
        raise EmptyEvalSet("evaluate: no prompts to evaluate (an empty eval set has no reward); "
                         "check the eval data file and the max-prompts setting")
    out = {"eval/reward_mean": total / max(count, 1), "eval/response_len_mean": length / max(count, 1),
           "eval/num_prompts": n_prompts, "eval/reward_errors": errors}
    for k, v in zip(ks, sums[5:]):
        out[f"eval/pass@{k}"] = v / max(n_prompts, 1)
    out["eval/accuracy"] = out["eval/pass@1"]
    return out
