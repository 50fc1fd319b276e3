"""`miles-fsdp rl`: the RL loop, colocated and SPMD (one process per device, or one on CPU).

    for step in range(start, steps):
        batch  = rollout(engine, prompts)          # samples + logprobs + rewards (this rank's slice)
        adv    = advantages(batch)                 # group baselines, global whitening via all_reduce
        mbs    = trainer.pack(train_seqs(batch))   # prompt+response, loss on response tokens
        m      = trainer.train_step(mbs, loss)     # also checks trainer logp == rollout logp
        sync_engine(trainer, engine)               # param.to(bf16) gathered from the shards
        log(m); eval every k; checkpoint every k

With rollout.servers the engine is an HTTP client of `miles-fsdp serve` instances
(rl/remote.py) and sync goes through a checkpoint directory; nothing else changes.

Debug modes: rollout_only saves each rollout batch to run_dir/rollouts/step_XXXXX.jsonl and
trains nothing; train_only reads those files and runs no engine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

import miles_kernels as mk
from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.data.sample import load_samples, save_samples
from miles_fsdp.data.tokenizer import load_tokenizer, prompt_format_of, record_prompt_format
from miles_fsdp.observe.metrics import MetricsLogger, Timers, drop_rows_after
from miles_fsdp.observe.profiler import StepProfiler
from miles_fsdp.observe.progress import Progress
from miles_fsdp.parallel import init_distributed
from miles_fsdp.rewards.registry import load_reward
from miles_fsdp.rl.config import RLConfig
from miles_fsdp.rl.evaluate import evaluate
from miles_fsdp.rl.generate_hook import load_generate
from miles_fsdp.rl.rollout import RolloutBatch, request_seed, rollout
from miles_fsdp.rl.remote import RemoteEngine
from miles_fsdp.rl.setup import rollout_engine
from miles_fsdp.rl import state
from miles_fsdp.rl.step import RLLoss, compute_advantages, kl_penalties, padded_masks, to_train_seqs
from miles_fsdp.train.checkpoint import StopSignal
from miles_fsdp.train.export import export_hf, load_model
from miles_fsdp.train.reference import ReferencePolicy
from miles_fsdp.train.run_dir import prepare_run_dir
from miles_fsdp.train.trainer import Trainer

logger = logging.getLogger(__name__)


PROGRESS_KEYS = ("rollout/reward_mean", "eval/accuracy", "train/logprob_abs_diff_max", "train/loss",
                 "perf/rollout_tokens_per_s")


class OnPolicyError(RuntimeError):
    """Invariant mode found trainer log-probs that differ from the rollout's."""


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def run_rl(cfg: RLConfig) -> dict:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mk.set_mode(cfg.kernel_mode)
    torch.manual_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg.run_dir, cfg.resume, cfg.overwrite, "--resume", "--run-dir")
    rollout_dir = Path(cfg.rollout_dir or run_dir / "rollouts")
    tokenizer = load_tokenizer(cfg.model)
    dataset = PromptDataset(cfg.data, tokenizer.tokenize_prompt)
    reward_fn = load_reward(cfg.rollout.reward, **_reward_options(cfg))
    hook = load_generate(cfg.rollout.generate_fn) if cfg.rollout.generate_fn else None
    dtype = cfg.trainer.parallel.compute_dtype(device)
    scoring = cfg.scoring  # the sampled distribution: the trainer and the reference score tokens under it

    training = cfg.debug_mode != "rollout_only"
    trainer = Trainer(load_model(cfg.model), cfg.trainer, device=device) if training else None
    engine = rollout_engine(cfg, tokenizer, dtype, device, rank) if cfg.debug_mode != "train_only" else None
    weights_dir = cfg.rollout.weights_dir or run_dir / "weights"
    reference = ReferencePolicy(load_model(cfg.model), trainer) if training and cfg.algo.needs_reference else None
    eval_prompts = _eval_prompts(cfg, tokenizer)
    timers = Timers(sync=torch.cuda.synchronize if device.type == "cuda" else None)
    start = state.resume(run_dir, trainer, dataset) if cfg.resume and trainer is not None else 0
    log = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start if cfg.resume else None)
    if cfg.resume and rank == 0:
        drop_rows_after(run_dir / "samples.jsonl", start)
    # servers may hold other weights than cfg.model (an earlier run): always send the policy
    if engine is not None and trainer is not None and (start or cfg.rollout.servers):
        state.sync_engine(trainer, engine, dtype, version=start, weights_dir=weights_dir)
    stop = StopSignal()
    profiler = StepProfiler(cfg.profile, run_dir, rank)
    progress = Progress(cfg.steps, start, "rl", enabled=rank == 0, keys=PROGRESS_KEYS)
    n = cfg.rollout.n_samples_per_prompt
    diff_max_run = 0.0
    summary: dict = {}
    t_run = time.perf_counter()

    if engine is not None and eval_prompts and start == 0:
        log.log(0, _eval(cfg, engine, tokenizer, eval_prompts, reward_fn))
    for step in range(start, cfg.steps):
        with profiler(step + 1):
            metrics: dict[str, float] = {}
            # 1-2. rollout + rewards (or read back a saved batch)
            data_state = dataset.state_dict()
            with timers("rollout"):
                if cfg.debug_mode == "train_only":
                    batch = RolloutBatch(load_samples(rollout_dir / f"step_{step:05d}_rank{rank}.jsonl"))
                else:
                    batch = rollout(
                        engine, tokenizer, lambda k: dataset.next_batch(k * world)[rank::world], reward_fn,
                        cfg.rollout, max(1, cfg.data.prompts_per_batch // world),
                        lambda i: request_seed(cfg.seed, step, rank, i), hook, _all_reduce_sum,
                        stop=stop.local, check_reward=step == start)
            if stop.requested():  # collective; a stop during rollout or reward discards the unfinished step
                dataset.load_state_dict(data_state)
                return _stopped(run_dir, trainer, dataset, step, stop, progress, engine)
            metrics.update(_rollout_metrics(batch, n))
            if cfg.log_samples and rank == 0:
                _log_samples(run_dir / "samples.jsonl", step + 1, batch.samples[: cfg.log_samples])
            metrics.update({"time/generate_s": batch.generate_s, "time/reward_s": batch.reward_s})
            if cfg.debug_mode == "rollout_only":
                rollout_dir.mkdir(parents=True, exist_ok=True)
                save_samples(rollout_dir / f"step_{step:05d}_rank{rank}.jsonl", batch.samples)
                log.log(step + 1, {**metrics, **timers.pop()})
                continue
            if metrics["rollout/samples"] == 0:  # e.g. dynamic sampling found no informative group
                logger.warning("step %d: no trainable samples after filtering; the step is skipped", step + 1)
                log.log(step + 1, {**metrics, **timers.pop(), "train/skipped_step": 1.0})
                continue
            release = cfg.release_engine_memory and engine is not None
            if release:  # the trainer gets the KV cache's memory until the sync
                engine.release_memory()
            # 3. advantages (with KL-in-reward, after the reference has scored the responses)
            ref_logps = penalty_NL = None
            if reference is not None:
                with timers("reference"):
                    ref_logps = state.reference_logprobs(reference, trainer, batch.samples, scoring)
            if cfg.algo.kl_reward_coef:
                penalty_NL = kl_penalties(batch.samples, ref_logps, cfg.algo)
                metrics["rollout/kl_reward_penalty"] = _token_mean(penalty_NL, padded_masks(batch.samples))
            adv_NL = compute_advantages(batch.samples, n, cfg.algo, _all_reduce_sum, penalty_NL)
            mbs = trainer.pack(to_train_seqs(batch.samples, adv_NL, ref_logps))
            # 4. train (the loss function compares trainer and rollout log-probs)
            loss_fn = RLLoss(cfg.algo, fast_mode=cfg.kernel_mode == "fast")
            norm, norm_constant = cfg.loss_norm
            with timers("train"):
                metrics.update(trainer.train_step(mbs, loss_fn, scoring, norm, norm_constant, entropy=True))
            metrics.update(_loss_metrics(loss_fn, device))
            diff_max_run = max(diff_max_run, metrics["train/logprob_abs_diff_max"])
            _check_on_policy(cfg, step + 1, metrics["train/logprob_abs_diff_max"])
            # 5. weight sync into the engine
            if engine is not None:
                with timers("sync"):
                    state.sync_engine(trainer, engine, dtype, version=step + 1, weights_dir=weights_dir)
                    if release:
                        engine.resume_memory()
            metrics.update(timers.pop())
            if engine is not None and eval_prompts and cfg.eval.every and (step + 1) % cfg.eval.every == 0 \
                    and step + 1 < cfg.steps:
                metrics.update(_eval(cfg, engine, tokenizer, eval_prompts, reward_fn))
            metrics["perf/rollout_tokens_per_s"] = _rollout_tokens(batch) / max(batch.generate_s, 1e-9)
            if engine is not None:
                metrics.update(engine.metrics())
            log.log(step + 1, metrics)
            progress.update(step + 1, metrics)
            if stop.requested():
                return _stopped(run_dir, trainer, dataset, step + 1, stop, progress, engine)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                state.save(run_dir, trainer, dataset)

    if engine is not None and eval_prompts:
        final = _eval(cfg, engine, tokenizer, eval_prompts, reward_fn)
        log.log(cfg.steps, final)
        summary.update(final)
    if trainer is not None:
        if (cfg.checkpoint_every or cfg.resume) and trainer.step > start:
            state.save(run_dir, trainer, dataset)
        if cfg.export_hf:
            export_hf(trainer.model, run_dir / "hf")
            if rank == 0:  # `generate --prompt` then encodes text as the training prompts were
                record_prompt_format(run_dir / "hf", prompt_format_of(p.prompt for p in dataset.prompts))
            summary["hf_dir"] = str(run_dir / "hf")
    stop.restore()
    progress.close()
    log.close()
    _close(engine)
    summary.update({"logprob_abs_diff_max": diff_max_run, "wall_seconds": time.perf_counter() - t_run,
                    "steps": cfg.steps, "run_dir": str(run_dir)})
    if rank == 0:
        (run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stopped(run_dir: Path, trainer, dataset, steps_done: int, stop: StopSignal, progress, engine) -> dict:
    """SIGTERM/SIGINT: checkpoint the state after `steps_done` steps (data position included)
    and end the run; --resume continues exactly from there."""
    if trainer is not None:
        state.save(run_dir, trainer, dataset)
        logger.warning("stop requested (SIGTERM/SIGINT): checkpoint written after step %d; resume with --resume",
                       steps_done)
    else:
        logger.warning("stop requested (SIGTERM/SIGINT) after step %d", steps_done)
    stop.restore()
    progress.close()
    _close(engine)
    return {"stopped_at_step": steps_done, "run_dir": str(run_dir)}


def _log_samples(path: Path, step: int, samples) -> None:
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, "group": s.group_index, "index": s.index, "prompt": s.prompt,
                                "response": s.response, "label": s.label, "reward": s.reward,
                                "status": s.status.value, "reward_error": s.reward_error,
                                "response_length": s.response_length}) + "\n")


def _check_on_policy(cfg: RLConfig, step: int, diff: float) -> None:
    # train_only replays saved batches: past its first step the policy has moved on, so the
    # difference is logged (it measures the staleness), not asserted
    if cfg.kernel_mode != "invariant" or cfg.debug_mode != "none" or diff == 0.0:
        return
    where = (" (rollout.servers: start each `miles-fsdp serve` with --dtype matching the trainer's compute dtype, "
             "on the same kind of device)" if cfg.rollout.servers else "")
    raise OnPolicyError(
        f"step {step}: trainer log-probs differ from the rollout's by up to {diff:.3g} in invariant mode; the engine "
        f"and the trainer must run the same model code, dtype and miles_kernels ops{where}. Use kernel_mode=fast to "
        "accept a mismatch (with algo.correction), or report this as a bug.")


def _close(engine) -> None:
    if isinstance(engine, RemoteEngine):
        engine.close()


def _reward_options(cfg: RLConfig) -> dict:
    return {"extract": cfg.rollout.answer_extract} if cfg.rollout.reward == "exact_match" else {}


def _eval(cfg: RLConfig, engine, tokenizer, prompts, reward_fn) -> dict[str, float]:
    e = cfg.eval
    return evaluate(engine, tokenizer, prompts, reward_fn, e.n_samples, e.temperature,
                    e.max_new_tokens or cfg.rollout.max_new_tokens, cfg.rollout.stop_strings, cfg.seed + 7919)


def _eval_prompts(cfg: RLConfig, tokenizer):
    if not cfg.eval.path:
        return []
    data = DataConfig(path=cfg.eval.path, prompt_key=cfg.data.prompt_key, label_key=cfg.data.label_key,
                      metadata_keys=cfg.data.metadata_keys, max_prompt_len=cfg.data.max_prompt_len, shuffle=False)
    ds = PromptDataset(data, tokenizer.tokenize_prompt)
    prompts = ds.next_batch(len(ds))
    return prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts


def _rollout_metrics(batch: RolloutBatch, n: int) -> dict[str, float]:
    s = batch.samples
    rewards = torch.tensor([x.reward for x in s], dtype=torch.float64)
    lens = torch.tensor([x.response_length for x in s], dtype=torch.float64)
    red = _all_reduce_sum(torch.tensor([float(rewards.sum()), float(len(s)), float(lens.sum()), float(lens.max()) if len(s) else 0.0,
                                        float(batch.num_reward_errors), float(batch.num_groups_dropped),
                                        float(sum(x.status.value == "truncated" for x in s)),
                                        float(batch.num_reward_timeouts)], dtype=torch.float64))
    total, count, length, _, errors, dropped, truncated, timeouts = red.tolist()
    return {"rollout/reward_mean": total / max(count, 1), "rollout/response_len_mean": length / max(count, 1),
            "rollout/samples": count, "rollout/reward_errors": errors, "rollout/reward_timeouts": timeouts,
            "rollout/groups_dropped": dropped, "rollout/truncated_frac": truncated / max(count, 1)}


def _loss_metrics(loss: RLLoss, device) -> dict[str, float]:
    names = sorted(loss.sums)
    red = torch.stack([loss.sums[k] for k in names]).double() if names else torch.zeros(0, dtype=torch.float64)
    red = _all_reduce_sum(red)
    diff = loss.diff_max.double().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    sums = dict(zip(names, red.tolist()))
    tokens = max(sums.pop("tokens", 1.0), 1.0)
    out = {"train/logprob_abs_diff_max": float(diff), "train/logprob_abs_diff_mean": sums.pop("diff_sum", 0.0) / tokens}
    names_map = {"clipped": "train/clip_frac", "entropy": "train/entropy", "kl": "train/kl_ref", "is_weight": "train/is_weight_mean"}
    out.update({names_map[k]: v / tokens for k, v in sums.items() if k in names_map})
    return out


def _token_mean(x_NL: torch.Tensor, mask_NL: torch.Tensor) -> float:
    """Mean of x over the loss tokens of every rank."""
    red = _all_reduce_sum(torch.tensor([float((x_NL * mask_NL).sum()), float(mask_NL.sum())], dtype=torch.float64))
    return float(red[0] / max(float(red[1]), 1.0))


def _rollout_tokens(batch: RolloutBatch) -> int:
    return sum(s.response_length for s in batch.samples)
