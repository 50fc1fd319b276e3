"""The RL loop's metrics: what a rollout batch and a training step add to metrics.jsonl,
summed over the ranks (so every rank logs the numbers of the whole global batch), and the
samples log. Names are API (docs/interfaces.md lists them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from miles_fsdp.data.sample import Sample
from miles_fsdp.parallel.reduce import all_reduce_max, all_reduce_sum
from miles_fsdp.rl.loss import RLLoss
from miles_fsdp.rl.rollout import RolloutBatch

_LOSS_SUMS = {"clipped": "train/clip_frac", "entropy": "train/entropy", "kl": "train/kl_ref",
              "is_weight": "train/is_weight_mean"}


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    s = batch.samples
    total, count, length, errors, timeouts, dropped, truncated = all_reduce_sum([
        float(torch.tensor([x.reward for x in s], dtype=torch.float64).sum()), len(s), sum(x.response_length for x in s), batch.num_reward_errors,
        batch.num_reward_timeouts, batch.num_groups_dropped, sum(x.status.value == "truncated" for x in s)])
    return {"rollout/reward_mean": total / max(count, 1), "rollout/response_len_mean": length / max(count, 1),
            "rollout/samples": count, "rollout/reward_errors": errors, "rollout/reward_timeouts": timeouts,
            "rollout/groups_dropped": dropped, "rollout/truncated_frac": truncated / max(count, 1),
            "time/generate_s": batch.generate_s, "time/reward_s": batch.reward_s,
            "perf/rollout_tokens_per_s": sum(x.response_length for x in s) / max(batch.generate_s, 1e-9)}


def loss_metrics(loss: RLLoss) -> dict[str, float]:
    """The on-policy check's maximum (over ranks) and the loss's token means."""
    names = sorted(loss.sums)
    sums = dict(zip(names, all_reduce_sum([float(loss.sums[k]) for k in names])))
    tokens = max(sums.pop("tokens", 1.0), 1.0)
    out = {"train/logprob_abs_diff_max": all_reduce_max([float(loss.diff_max)])[0],
           "train/logprob_abs_diff_mean": sums.pop("diff_sum", 0.0) / tokens}
    out.update({_LOSS_SUMS[k]: v / tokens for k, v in sums.items() if k in _LOSS_SUMS})
    return out


def token_mean(x_NL: torch.Tensor, mask_NL: torch.Tensor) -> float:
    """Mean of x over the loss tokens of every rank."""
    total, count = all_reduce_sum([float((x_NL * mask_NL).sum()), float(mask_NL.sum())])
    return total / max(count, 1.0)


def log_samples(path: Path, step: int, samples: list[Sample]) -> None:
    """Append samples (prompt, response, reward, why a reward failed) to a jsonl file."""
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, "group": s.group_index, "index": s.index, "prompt": s.prompt,
                                "response": s.response, "label": s.label, "reward": s.reward,
                                "status": s.status.value, "reward_error": s.reward_error,
                                "response_length": s.response_length}) + "\n")
