"""`miles-fsdp rl`: the RL loop, colocated and SPMD (one process per device, or one on CPU).

    run = setup(cfg)                                   parts and logs (rl/run.py)
    for each step:
        batch = rollout(...)                           1-2. sample n responses per prompt, score them
        ref, adv = advantages(run, batch)              3.   reference scores, KL-in-reward, group baselines
        metrics = train(run, batch, ref, adv)          4.   one optimizer step; asserts trainer logp == rollout logp
        sync(run, version)                             5.   the new weights into the rollout source
        eval, log, checkpoint                          6.
    finish(run)

The rollout source (engine/source.py) is the in-process engine, `miles-fsdp serve`
instances over HTTP, or a replay of saved samples (train_only); rollout_only has no trainer
and saves each batch instead of training on it. SIGTERM/SIGINT ends the run at the next
phase boundary with a checkpoint (a step cut short in its rollout is discarded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from miles_fsdp.data.sample import save_samples
from miles_fsdp.parallel.reduce import sum_tensor
from miles_fsdp.rl.config import RLConfig
from miles_fsdp.rl.loss import RLLoss
from miles_fsdp.rl.metrics import log_samples, loss_metrics, rollout_metrics, token_mean
from miles_fsdp.rl.rollout import RolloutBatch, request_seed, rollout
from miles_fsdp.rl.run import Run, eval_metrics, finish, save, setup, stopped
from miles_fsdp.rl.train_data import compute_advantages, kl_penalties, padded_masks, reference_logprobs, to_train_seqs

logger = logging.getLogger(__name__)


class OnPolicyError(RuntimeError):
    """Invariant mode found trainer log-probs that differ from the rollout's."""


def run_rl(cfg: RLConfig) -> dict:
    run = setup(cfg)
    if run.eval_prompts and run.start == 0:
        run.log.log(0, eval_metrics(run))
    for step in range(run.start, cfg.steps):
        with run.profiler(step + 1):
            data_state = run.dataset.state_dict()
            with run.timers("rollout"):
                batch = rollout_batch(run, step)
            if run.stop.requested():  # collective; a stop during rollout or reward drops the unfinished step
                run.dataset.load_state_dict(data_state)
                return stopped(run, step)
            metrics = rollout_metrics(batch)
            if cfg.log_samples and run.rank == 0:
                log_samples(run.run_dir / "samples.jsonl", step + 1, batch.samples[: cfg.log_samples])
            if run.trainer is None:  # rollout_only: the batch is saved, not trained on
                keep_batch(run, step, batch)
            elif metrics["rollout/samples"] == 0:  # e.g. dynamic sampling found no informative group
                logger.warning("step %d: no trainable samples after filtering; the step is skipped", step + 1)
                metrics["train/skipped_step"] = 1.0
            else:
                if cfg.release_engine_memory:  # the trainer gets the KV cache's memory until the sync
                    run.source.release()
                ref_logps, adv_NL = advantages(run, batch, metrics)
                metrics.update(train(run, batch, ref_logps, adv_NL))
                with run.timers("sync"):
                    run.source.update_weights(run.weights, version=step + 1)
                    if cfg.release_engine_memory:
                        run.source.resume()
                if run.eval_prompts and cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                    metrics.update(eval_metrics(run))
            metrics.update({**run.timers.pop(), **run.source.metrics()})
            run.log.log(step + 1, metrics)
            run.progress.update(step + 1, metrics)
            if run.stop.requested():
                return stopped(run, step + 1)
            if run.trainer is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save(run)
    return finish(run)


def rollout_batch(run: Run, step: int) -> RolloutBatch:
    """1-2. This rank's share of the step's prompts, n samples each, scored (and filtered)."""
    cfg, world, rank = run.cfg, run.world, run.rank
    return rollout(run.source, run.tokenizer, lambda k: run.dataset.next_batch(k * world)[rank::world], run.reward_fn,
                   cfg.rollout, run.scoring, max(1, cfg.data.prompts_per_batch // world),
                   lambda i: request_seed(cfg.seed, step, rank, i), run.hook, sum_tensor,
                   stop=run.stop.local, check_reward=step == run.start)


def keep_batch(run: Run, step: int, batch: RolloutBatch) -> None:
    """rollout_only's train phase: save every sample generated (dropped groups too), so a
    train_only run replays the step exactly."""
    out = Path(run.cfg.rollout_dir or run.run_dir / "rollouts")
    out.mkdir(parents=True, exist_ok=True)
    save_samples(out / f"step_{step:05d}_rank{run.rank}.jsonl", batch.generated)


def advantages(run: Run, batch: RolloutBatch, metrics: dict) -> tuple[list[list[float]] | None, torch.Tensor]:
    """3. Reference scores (if a KL term needs them), KL-in-reward, per-token advantages."""
    ref_logps = penalty_NL = None
    if run.reference is not None:
        with run.timers("reference"):
            ref_logps = reference_logprobs(run.reference, run.trainer, batch.samples, run.scoring)
    if run.cfg.algo.kl_reward_coef:
        penalty_NL = kl_penalties(batch.samples, ref_logps, run.cfg.algo)
        metrics["rollout/kl_reward_penalty"] = token_mean(penalty_NL, padded_masks(batch.samples))
    n = run.cfg.rollout.n_samples_per_prompt
    return ref_logps, compute_advantages(batch.samples, n, run.cfg.algo, sum_tensor, penalty_NL)


def train(run: Run, batch: RolloutBatch, ref_logps, adv_NL) -> dict[str, float]:
    """4. One optimizer step; the loss compares trainer and rollout log-probs on the way."""
    mbs = run.trainer.pack(to_train_seqs(batch.samples, adv_NL, ref_logps))
    loss_fn = RLLoss(run.cfg.algo, run.scoring)
    norm, norm_constant = run.cfg.loss_norm
    with run.timers("train"):
        metrics = run.trainer.train_step(mbs, loss_fn, run.scoring, norm, norm_constant, entropy=True)
    metrics.update(loss_metrics(loss_fn))
    run.diff_max = max(run.diff_max, metrics["train/logprob_abs_diff_max"])
    check_on_policy(run, metrics["train/logprob_abs_diff_max"])
    return metrics


def check_on_policy(run: Run, diff: float) -> None:
    # train_only replays saved batches: past its first step the policy has moved on, so the
    # difference is logged (it measures the staleness), not asserted
    cfg = run.cfg
    if cfg.kernel_mode != "invariant" or cfg.debug_mode != "none" or diff == 0.0:
        return
    where = (" (rollout.servers: start each `miles-fsdp serve` with the trainer's compute dtype, --dtype auto, "
             "on the same kind of device)" if cfg.rollout.servers else "")
    raise OnPolicyError(
        f"step {run.trainer.step}: trainer log-probs differ from the rollout's by up to {diff:.3g} in invariant "
        f"mode; the engine and the trainer must run the same model code, dtype and miles_kernels ops{where}. Use "
        "kernel_mode=fast to accept a mismatch (with algo.correction), or report this as a bug.")
