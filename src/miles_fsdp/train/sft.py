"""Supervised fine-tuning: the trainer, checkpoints and metrics on a jsonl of
prompt/response pairs or chat conversations (see `sft_data.py`). A model with an MTP draft
(checkpoint's num_nextn_predict_layers, or --draft.n-mtp) trains it beside the policy on the
same forward (train/draft.py; --draft.enabled False leaves it alone), checkpoints it with
its optimizer and exports it.

Data order is a function of the step (a seeded permutation per epoch), so the data
position saved in a checkpoint is the step and a resumed run sees exactly the batches the
uninterrupted run would have seen.

    torchrun --nproc-per-node 8 -m miles_fsdp.commands.sft --model DIR --data train.jsonl
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from miles_fsdp.data.tokenizer import record_prompt_format
from miles_fsdp.models import load_model
from miles_fsdp.observe.metrics import MetricsLogger
from miles_fsdp.observe.progress import Progress
from miles_fsdp.observe.profiler import ProfileConfig, StepProfiler
from miles_fsdp.parallel import init_distributed
from miles_fsdp.train.checkpoint import (CheckpointConfig, StopSignal, latest_checkpoint, load_checkpoint,
                                         load_newest_good, save_checkpoint)
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.export import export_hf
from miles_fsdp.train.loss import LossNorm, sft_loss
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.pending import OneStepBehind
from miles_fsdp.train.run_dir import prepare_run_dir
from miles_fsdp.train.sft_data import load_sft_jsonl
from miles_fsdp.train.trainer import Trainer, TrainerConfig


@dataclass
class SFTConfig:
    model: str
    """HF checkpoint directory to start from (config.json, safetensors, tokenizer)."""
    data: str
    """jsonl: one {"prompt", "response"} or {"messages": [...]} object per line."""
    out: str = "runs/sft"
    """Run directory: metrics.jsonl, tensorboard, checkpoints/ (unless checkpoint.dir is set), hf/."""
    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over all ranks."""
    max_seq_len: int = 4096
    """Longer examples are truncated to this many tokens."""
    seed: int = 0
    """Seed of the data order."""
    export_hf: bool = True
    """Write the final weights as an HF checkpoint to <out>/hf."""
    loss_norm: LossNorm = LossNorm.token_mean
    """token_mean (over all trained tokens of the global batch), seq_mean (per sequence, then
    over sequences), or constant (each sequence's token sum / loss_norm_constant)."""
    loss_norm_constant: float = 1.0
    """For loss_norm=constant: the fixed per-sequence length C dividing each sequence's token sum."""
    overwrite: bool = False
    """Start over in an `out` directory that holds a run: the old run is moved aside to
    OUT.old-<time> (never deleted), and no checkpoint is resumed."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces of chosen steps (OUT/profile; see observe/profiler.py)."""
    draft: DraftConfig = field(default_factory=DraftConfig)
    """The MTP draft: trained beside the policy whenever the model has one (train/draft.py)."""

    def __post_init__(self):
        if not Path(self.model).is_dir():
            raise ValueError(f"SFTConfig.model={self.model!r}: not a directory; pass an HF checkpoint directory")
        if not Path(self.data).is_file():
            raise ValueError(f"SFTConfig.data={self.data!r}: file not found")
        if self.steps < 1 or self.global_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("SFTConfig: steps and global_batch_size must be >= 1, max_seq_len >= 2")
        self.loss_norm = LossNorm(self.loss_norm)
        if self.loss_norm_constant <= 0:
            raise ValueError(f"SFTConfig.loss_norm_constant={self.loss_norm_constant}: must be > 0")
        if self.max_seq_len > self.trainer.max_tokens_per_micro_batch:
            raise ValueError(
                f"SFTConfig.max_seq_len={self.max_seq_len} exceeds trainer.max_tokens_per_micro_batch="
                f"{self.trainer.max_tokens_per_micro_batch}; a sequence must fit one micro-batch"
            )


def batch_for_step(examples: list[TrainSeq], step: int, batch_size: int, seed: int) -> list[TrainSeq]:
    """The global batch of `step`: items step*B .. step*B+B-1 of an endless stream of
    seeded per-epoch permutations."""
    n, out = len(examples), []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(examples[int(perm[j])])
    return out


def train_sft(cfg: SFTConfig) -> list[dict]:
    """Run SFT; return the metrics of every step run (rank 0 also writes them to disk)."""
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoTokenizer

    formats: set[str] = set()
    examples = load_sft_jsonl(cfg.data, AutoTokenizer.from_pretrained(cfg.model), cfg.max_seq_len, formats)
    ck = cfg.checkpoint
    ck_dir = ck.dir or str(Path(cfg.out) / "checkpoints")
    resume = None
    if not cfg.overwrite:
        resume = latest_checkpoint(ck_dir) if ck.resume == "auto" else None if ck.resume == "never" else ck.resume
    # out holding a run: continue it from its checkpoint, or refuse (never append to it blindly)
    prepare_run_dir(cfg.out, resume is not None, cfg.overwrite, "--checkpoint.resume auto (with a checkpoint "
                    "in --checkpoint.dir)", "--out")
    model = load_model(cfg.model, n_mtp=cfg.draft.n_mtp_for(cfg.model))
    trainer = Trainer(model, cfg.trainer, draft=cfg.draft if cfg.draft.trains(model.args.n_mtp, default=True) else None)
    if resume is not None and ck.resume == "auto":  # the newest that loads (a corrupt one is skipped)
        resume = load_newest_good(trainer, ck_dir)[0]
    elif resume is not None:
        load_checkpoint(trainer, resume)
    logger = MetricsLogger(cfg.out, enabled=rank == 0, resume_step=trainer.step if resume is not None else None)
    progress = Progress(cfg.steps, start=trainer.step, desc="sft", enabled=rank == 0)
    stop = StopSignal()
    profiler = StepProfiler(cfg.profile, cfg.out, rank)
    history = []
    steps = OneStepBehind(history, logger, progress)  # each step's metrics read once the next is queued
    try:
        while trainer.step < cfg.steps:
            seqs = batch_for_step(examples, trainer.step, cfg.global_batch_size, cfg.seed)[rank::world]
            with profiler(trainer.step + 1):
                # queued, not waited for: the host packs and launches the next step while this one runs
                pending = trainer.train_step_async(trainer.pack(seqs), sft_loss, norm=cfg.loss_norm,
                                                   norm_constant=cfg.loss_norm_constant)
            steps.push(trainer.step, pending)
            stopping = stop.requested()
            if stopping or (ck.interval and trainer.step % ck.interval == 0) or trainer.step == cfg.steps:
                steps.flush()  # the log holds a checkpoint's step before the checkpoint is written
                save_checkpoint(trainer, ck_dir, extra={"data_step": trainer.step}, keep=ck.keep)
            if stopping:
                break
        steps.flush()
        if cfg.export_hf and trainer.step == cfg.steps:
            export_hf(trainer.model, Path(cfg.out) / "hf")
            if rank == 0:  # `generate --prompt` then encodes text as this data did
                record_prompt_format(Path(cfg.out) / "hf", formats.pop() if len(formats) == 1 else None)
    except BaseException:
        with contextlib.suppress(Exception):
            steps.flush()  # the last step that ran keeps its line in the log
        raise
    finally:
        stop.restore()
        progress.close()
        logger.close()
    return history
