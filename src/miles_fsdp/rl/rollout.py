"""Rollout: prompts -> engine samples -> rewards, as groups of `Sample`s.

    prompts (this rank's slice) --make_group--> n samples each
        --engine.generate / custom generate hook--> response ids + logprobs + status
        --reward--> sample.reward (a raising reward scores `reward_on_error`, never fatal)
        --DAPO dynamic sampling--> only groups whose rewards differ, refilled from more prompts

Seeds are a hash of (run seed, step, prompt's place in the batch), so a rollout does not
depend on the batch it runs in and an exact resume regenerates the same samples.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import torch

from miles_fsdp.data.sample import Sample, Status, make_group
from miles_fsdp.engine.remote import RemoteEngineError
from miles_fsdp.engine.sequence import FinishReason, Request, SamplingParams
from miles_fsdp.errors import UserError
from miles_fsdp.rewards.registry import RewardStopped, score_samples
from miles_fsdp.rl.config import RolloutConfig
from miles_fsdp.rl.filters import dynamic_sampling_filter, expand_group_mask, overlong_penalty
from miles_fsdp.rl.generate_hook import TurnOutput, check_generated
from miles_fsdp.train.scoring import ScoringSpec

logger = logging.getLogger(__name__)

_STATUS = {FinishReason.STOP: Status.COMPLETED, FinishReason.LENGTH: Status.TRUNCATED,
           FinishReason.ABORT: Status.ABORTED}


def request_seed(*parts: int) -> int:
    """A 32-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def sampling_params(cfg: RolloutConfig, spec: ScoringSpec, n: int, seed: int) -> SamplingParams:
    """The engine's sampling parameters: the scoring spec's distribution, the rollout's lengths and stops."""
    return SamplingParams(n=n, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                          max_new_tokens=cfg.max_new_tokens, stop_strings=cfg.stop_strings, seed=seed)


def generate(source, tokenizer, prompts: list[Sample], n: int, params_for, hook=None, stop=None) -> list[Sample]:
    """Sample n responses for each prompt from a rollout source (engine/source.py).
    params_for(i) -> SamplingParams of prompt i (n set). Once `stop()` returns True,
    unfinished samples end ABORTED (the loop then discards the step)."""
    groups = [make_group(p, n, gi) for gi, p in enumerate(prompts)]
    if hook is not None:
        return _generate_with_hook(source, groups, params_for, hook, stop)
    requests = [Request(p.prompt_ids, params_for(i)) for i, p in enumerate(prompts)]
    for group, results in zip(groups, source.generate(requests, stop=stop)):
        for sample, res in zip(group, sorted(results, key=lambda r: r.sample_index)):
            sample.response_ids = list(res.token_ids)
            sample.response_logprobs = res.logprobs.tolist()
            sample.loss_mask = [1] * len(res.token_ids)
            sample.status = _STATUS[res.finish_reason]
            sample.weight_version, sample.seed = res.weight_version, res.seed
            sample.response = tokenizer.decode(res.token_ids, skip_special_tokens=True) if tokenizer else ""
    return [s for g in groups for s in g]


class _Stopping(Exception):
    """Raised into a generate hook's engine call once a stop was requested."""


def _generate_with_hook(source, groups, params_for, hook, stop=None) -> list[Sample]:
    """Run one hook coroutine per sample, concurrently; each engine call is one
    `source.agenerate` (the in-process engine batches concurrent calls into shared steps).
    On stop, calls in flight are aborted and new ones raise, so every hook ends promptly."""

    def stop_now() -> bool:
        return stop is not None and stop()

    async def run_one(sample, params):
        async def engine_call(prompt_ids, call_params) -> TurnOutput:
            if stop_now():
                raise _Stopping("stop requested")
            call_params = SamplingParams(**{**call_params.__dict__, "n": 1})
            return _turn(await source.agenerate(list(prompt_ids), call_params, stop=stop))

        sample.seed = params.seed
        try:
            return check_generated(await hook(sample, engine_call, params))
        except RemoteEngineError:  # a server down is the run's problem, not the sample's
            raise
        except Exception as e:  # a failing hook fails its sample, not the run
            logger.warning("generate hook failed on sample %d (group %d): %r", sample.index, sample.group_index, e)
            sample.status = Status.FAILED
            return sample

    async def main():
        return await asyncio.gather(*(run_one(s, SamplingParams(**{**params_for(gi).__dict__, "n": 1}))
                                      for gi, g in enumerate(groups) for s in g))

    return list(asyncio.run(main()))


def _turn(r) -> TurnOutput:
    return TurnOutput(list(r.token_ids), r.logprobs.tolist(), r.finish_reason.value)


@dataclass
class RolloutBatch:
    samples: list[Sample]
    """Samples of kept groups, groups contiguous, n per group."""
    num_reward_errors: int = 0
    """Samples scored reward_on_error (raised, non-number, or timed out)."""
    num_reward_timeouts: int = 0
    """Of those, samples whose reward did not return within rollout.reward_timeout_s."""
    stopped: bool = False
    """A stop (SIGTERM/SIGINT) cut the rollout short: the batch is incomplete, never trained on."""
    num_groups_dropped: int = 0
    generated: list[Sample] = field(default_factory=list)
    """Every sample generated for the batch, dropped groups included (what a rollout-only run
    saves, so a train-only run replays the step exactly)."""
    generate_s: float = 0.0
    """Wall time in the engine (or the generate hook)."""
    reward_s: float = 0.0
    """Wall time scoring rewards."""


class RewardFunctionError(UserError, ValueError):
    """The reward function failed on every sample of the run's first batch: it cannot work."""


def rollout(source, tokenizer, next_prompts, reward_fn, cfg: RolloutConfig, spec: ScoringSpec, target_groups: int,
            seed_of, hook=None, all_reduce_sum=None, stop=None, check_reward: bool = False) -> RolloutBatch:
    """Generate and score groups until `target_groups` are kept (or rounds run out).

    next_prompts(k) -> this rank's next k prompts; seed_of(prompt_number) -> request seed.
    Without dynamic sampling exactly one round runs and every group is kept. `stop()`
    (this rank's stop flag) cuts generation and scoring short: the batch comes back with
    `stopped` set. check_reward: raise RewardFunctionError if the reward failed on every sample.
    """
    n = cfg.n_samples_per_prompt
    kept: list[Sample] = []
    generated: list[Sample] = []
    errors = timeouts = dropped = sampled = 0
    t_gen = t_reward = 0.0
    want = target_groups
    stopped = False
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        prompts = next_prompts(want)
        base = sampled
        sampled += len(prompts)
        t0 = time.perf_counter()
        samples = generate(source, tokenizer, prompts, n,
                           lambda i: sampling_params(cfg, spec, n, seed_of(base + i)), hook, stop)
        generated += samples
        t1 = time.perf_counter()
        usable = [s for s in samples if s.status in (Status.COMPLETED, Status.TRUNCATED)]
        stopped = stop is not None and stop()
        report = None
        if usable and not stopped:
            try:
                report = score_samples(usable, reward_fn, cfg.reward_on_error, timeout_s=cfg.reward_timeout_s,
                                       stop=stop)
            except RewardStopped:
                stopped = True
        t_gen, t_reward = t_gen + t1 - t0, t_reward + time.perf_counter() - t1
        if report is not None:
            errors, timeouts = errors + report.num_errors, timeouts + report.num_timeouts
            if check_reward and report.num_errors == len(usable):
                raise RewardFunctionError(_all_failed(cfg, usable))
        for s in samples:
            if s.status not in (Status.COMPLETED, Status.TRUNCATED):
                s.reward = cfg.reward_on_error  # failed/aborted: no gradient (mask cleared below)
                s.loss_mask = [0] * len(s.response_ids)
        if cfg.overlong_buffer:
            lens = torch.tensor([s.response_length for s in samples])
            pen = overlong_penalty(lens, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
            for s, p in zip(samples, pen.tolist()):
                s.reward += p
        if not cfg.dynamic_sampling:
            kept = samples
            break
        rewards = torch.tensor([s.reward for s in samples])
        res = dynamic_sampling_filter(rewards, n, want)
        keep = expand_group_mask(res.keep_G, n).tolist()
        kept += [s for s, k in zip(samples, keep) if k]
        dropped += res.num_dropped
        want = res.groups_needed
        still = torch.tensor([float(want), float(stopped)])
        if all_reduce_sum is not None:  # every rank runs the same number of rounds
            all_reduce_sum(still)
        if float(still[0]) == 0 or float(still[1]) > 0:
            break
    _renumber(kept, n)
    return RolloutBatch(kept, num_reward_errors=errors, num_reward_timeouts=timeouts, stopped=stopped,
                        num_groups_dropped=dropped, generated=generated, generate_s=t_gen, reward_s=t_reward)


def _all_failed(cfg: RolloutConfig, samples: list[Sample]) -> str:
    s = samples[0]
    return (f"reward {cfg.reward!r} failed on all {len(samples)} samples of the first rollout batch, e.g. sample "
            f"{s.index} (label {s.label!r}, response {s.response[:80]!r}): {s.reward_error}. It must return one "
            "finite number per sample (a list of them if batched); fix it, or raise rollout.reward_timeout_s if it "
            "only needs more time.")


def _renumber(samples: list[Sample], n: int) -> None:
    for i, s in enumerate(samples):
        s.index, s.group_index = i, i // n
