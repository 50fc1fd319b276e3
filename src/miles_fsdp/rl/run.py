"""An RL run's parts, built once from the config, and the ways a run ends.

    setup(cfg) -> Run        process group, run directory, tokenizer, data, reward, scoring
                             spec, trainer (none in rollout_only), rollout source, reference,
                             eval prompts, logs, stop signal; resumes from a checkpoint
    save(run)                checkpoint: policy (and draft), optimizers, schedules, RNG, data position
    stopped(run, steps)      SIGTERM/SIGINT: checkpoint and end (--resume continues exactly)
    finish(run)              final eval, checkpoint, HF export, rl_summary.json

The rollout source is the one interface of engine/source.py; the debug modes are a choice of
it (train_only: ReplaySource of saved samples) and of the train phase (rollout_only: no
trainer, the loop saves each batch instead), never branches inside the step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.data.sample import Sample
from miles_fsdp.data.tokenizer import Tokenizer, load_tokenizer, prompt_format_of, record_prompt_format
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.engine import Engine
from miles_fsdp.engine.remote import RemoteEngine
from miles_fsdp.engine.replay import ReplaySource
from miles_fsdp.engine.source import RolloutSource
from miles_fsdp.models import load_model
from miles_fsdp.observe.metrics import MetricsLogger, Timers, drop_rows_after
from miles_fsdp.observe.profiler import StepProfiler
from miles_fsdp.observe.progress import Progress
from miles_fsdp.parallel import init_distributed
from miles_fsdp.rewards.registry import load_reward
from miles_fsdp.rl.config import RLConfig
from miles_fsdp.rl.evaluate import evaluate
from miles_fsdp.rl.generate_hook import load_generate
from miles_fsdp.train.checkpoint import CheckpointError, StopSignal, load_newest_good, save_checkpoint
from miles_fsdp.train.export import export_hf
from miles_fsdp.train.reference import ReferencePolicy
from miles_fsdp.train.run_dir import prepare_run_dir
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import Trainer
from miles_fsdp.train.weight_sync import PolicyWeights

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("rollout/reward_mean", "eval/accuracy", "train/logprob_abs_diff_max", "train/loss",
                 "perf/rollout_tokens_per_s")


@dataclass
class Run:
    cfg: RLConfig
    rank: int
    world: int
    run_dir: Path
    tokenizer: Tokenizer
    dataset: PromptDataset
    reward_fn: object
    hook: object
    scoring: ScoringSpec
    """The distribution sampled from: the trainer, the reference and the check score under it."""
    trainer: Trainer | None
    """None in rollout_only: the train phase saves the batch instead."""
    source: RolloutSource
    weights: PolicyWeights | None
    """The trainer's weights in the engine's dtype, for update_weights."""
    reference: ReferencePolicy | None
    eval_prompts: list[Sample]
    log: MetricsLogger
    timers: Timers
    stop: StopSignal
    profiler: StepProfiler
    progress: Progress
    start: int
    diff_max: float = 0.0
    """Largest trainer vs rollout log-prob difference of the run."""
    t0: float = field(default_factory=time.perf_counter)


def setup(cfg: RLConfig) -> Run:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg.run_dir, cfg.resume, cfg.overwrite, "--resume", "--run-dir")
    tokenizer = load_tokenizer(cfg.model)
    dataset = PromptDataset(cfg.data, tokenizer.tokenize_prompt)
    reward_fn = load_reward(cfg.rollout.reward, **_reward_options(cfg))
    hook = load_generate(cfg.rollout.generate_fn) if cfg.rollout.generate_fn else None
    dtype = cfg.trainer.parallel.compute_dtype(device)
    trainer = None
    if cfg.debug_mode != "rollout_only":  # the policy trains its MTP draft too (cfg.trains_draft)
        trainer = Trainer(load_model(cfg.model, n_mtp=cfg.n_mtp), cfg.trainer, device=device,
                          draft=cfg.draft if cfg.trains_draft else None)
    weights = PolicyWeights(trainer.model, dtype) if trainer is not None else None
    source = rollout_source(cfg, tokenizer, dtype, device, rank, run_dir)
    reference = None
    if trainer is not None and cfg.algo.needs_reference:  # scores tokens only: no draft
        reference = ReferencePolicy(load_model(cfg.model, n_mtp=0), trainer)
    start = resume(run_dir, trainer, dataset) if cfg.resume and trainer is not None else 0
    log = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start if cfg.resume else None)
    if cfg.resume and rank == 0:
        drop_rows_after(run_dir / "samples.jsonl", start)
    if weights is not None and (start or cfg.rollout.servers):  # servers may hold an earlier run's weights
        source.update_weights(weights, version=start)
    return Run(cfg, rank, world, run_dir, tokenizer, dataset, reward_fn, hook, cfg.scoring, trainer, source,
               weights, reference, _eval_prompts(cfg, tokenizer),
               log, Timers(sync=torch.cuda.synchronize if device.type == "cuda" else None), StopSignal(),
               StepProfiler(cfg.profile, run_dir, rank), Progress(cfg.steps, start, "rl", enabled=rank == 0,
                                                                 keys=PROGRESS_KEYS), start)


def build_engine(path: str, tokenizer: Tokenizer | None, cfg: EngineConfig, dtype: torch.dtype,
                 device: torch.device, kernel_mode: str = "invariant", n_mtp: int | None = None) -> Engine:
    """An in-process engine on the checkpoint at `path`, in `dtype` on `device`; n_mtp: its
    draft modules (None: the checkpoint's; see models.load_model)."""
    model = load_model(path, dtype, device, n_mtp=n_mtp).eval()
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else None
    detok = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
    return Engine(model, None, cfg, eos_token_ids=eos, detokenize=detok, kernel_mode=kernel_mode)


def rollout_source(cfg: RLConfig, tokenizer, dtype, device, rank: int, run_dir: Path) -> RolloutSource:
    """This rank's rollout source: a replay of saved samples (train_only), a client of
    rollout.servers, or a colocated engine."""
    if cfg.debug_mode == "train_only":
        return ReplaySource(cfg.rollout_dir or run_dir / "rollouts", rank)
    if cfg.rollout.servers:
        return RemoteEngine(cfg.rollout.servers, cfg.rollout.weights_dir or run_dir / "weights",
                            cfg.rollout.request_timeout_s, start=rank)
    return build_engine(cfg.model, tokenizer, cfg.engine, dtype, device, cfg.kernel_mode, cfg.n_mtp)


def eval_metrics(run: Run) -> dict[str, float]:
    e, r = run.cfg.eval, run.cfg.rollout
    return evaluate(run.source, run.tokenizer, run.eval_prompts, run.reward_fn, e.n_samples, e.temperature,
                    e.max_new_tokens or r.max_new_tokens, r.stop_strings, run.cfg.seed + 7919)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run: Run) -> Path:
    return save_checkpoint(run.trainer, checkpoint_root(run.run_dir), extra={"dataset": run.dataset.state_dict()},
                           keep=2)


def resume(run_dir: Path, trainer: Trainer, dataset: PromptDataset) -> int:
    """Load the newest checkpoint under run_dir/checkpoints that loads (a corrupt newer one
    is skipped, with a warning); returns the step to continue from."""
    found = load_newest_good(trainer, checkpoint_root(run_dir))
    if found is None:
        raise CheckpointError(
            f"resume=True but {checkpoint_root(run_dir)} holds no step_* checkpoint; run without --resume "
            "to start fresh, or point --run-dir at the run to continue")
    if "dataset" in found[1]:
        dataset.load_state_dict(found[1]["dataset"])
    return trainer.step


def stopped(run: Run, steps_done: int) -> dict:
    """SIGTERM/SIGINT: checkpoint the state after `steps_done` steps (data position included)
    and end the run; --resume continues exactly from there."""
    if run.trainer is not None:
        save(run)
        logger.warning("stop requested (SIGTERM/SIGINT): checkpoint written after step %d; resume with --resume",
                       steps_done)
    else:
        logger.warning("stop requested (SIGTERM/SIGINT) after step %d", steps_done)
    _close(run)
    return {"stopped_at_step": steps_done, "run_dir": str(run.run_dir)}


def finish(run: Run) -> dict:
    cfg, summary = run.cfg, {}
    if run.eval_prompts:
        summary.update(eval_metrics(run))
        run.log.log(cfg.steps, summary)
    if run.trainer is not None:
        if (cfg.checkpoint_every or cfg.resume) and run.trainer.step > run.start:
            save(run)
        if cfg.export_hf:
            export_hf(run.trainer.model, run.run_dir / "hf")
            if run.rank == 0:  # `generate --prompt` then encodes text as the training prompts were
                record_prompt_format(run.run_dir / "hf", prompt_format_of(p.prompt for p in run.dataset.prompts))
            summary["hf_dir"] = str(run.run_dir / "hf")
    _close(run)
    summary.update({"logprob_abs_diff_max": run.diff_max, "wall_seconds": time.perf_counter() - run.t0,
                    "steps": cfg.steps, "run_dir": str(run.run_dir)})
    if run.rank == 0:
        (run.run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _close(run: Run) -> None:
    run.stop.restore()
    run.progress.close()
    run.log.close()
    run.source.close()


def _reward_options(cfg: RLConfig) -> dict:
    return {"extract": cfg.rollout.answer_extract} if cfg.rollout.reward == "exact_match" else {}


def _eval_prompts(cfg: RLConfig, tokenizer) -> list[Sample]:
    if not cfg.eval.path:
        return []
    data = DataConfig(path=cfg.eval.path, prompt_key=cfg.data.prompt_key, label_key=cfg.data.label_key,
                      metadata_keys=cfg.data.metadata_keys, max_prompt_len=cfg.data.max_prompt_len, shuffle=False)
    dataset = PromptDataset(data, tokenizer.tokenize_prompt)
    prompts = dataset.next_batch(len(dataset))
    return prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts
