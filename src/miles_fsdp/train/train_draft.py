"""Warm-start the MTP draft alone: the trunk frozen (no optimizer, forward without grad), the
draft trained on SFT data or on the model's own continuations, then exported with the trunk.

    data (jsonl/parquet, as sft reads it) --[--self-distill: prompt = tokens before each record's
      first trained token; the engine continues it (greedy at temperature 0)]--> TrainSeq
    for each step: the trunk's hidden states of the batch -> the draft's loss -> its AdamW
    OUT/hf: the checkpoint with the trained draft (num_nextn_predict_layers in config.json)

    miles-fsdp train-draft --model ckpt/ --data train.jsonl --out runs/draft [--self-distill]

A checkpoint without a draft gets a fresh one (--draft.n-mtp, default 1), initialised from
its last decoder layer; a checkpoint with one continues training it. Data order is the
sft's (a seeded permutation per epoch, sft.batch_for_step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from miles_fsdp.data.tokenizer import load_tokenizer, record_prompt_format
from miles_fsdp.engine.offline import generate_from_prompts
from miles_fsdp.models import load_model
from miles_fsdp.observe.metrics import MetricsLogger
from miles_fsdp.observe.progress import Progress
from miles_fsdp.parallel import ParallelConfig, init_distributed
from miles_fsdp.train.draft import DraftConfig, DraftConfigError
from miles_fsdp.train.export import export_hf
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.pending import OneStepBehind
from miles_fsdp.train.run_dir import prepare_run_dir
from miles_fsdp.train.sft import batch_for_step
from miles_fsdp.train.sft_data import load_sft_jsonl
from miles_fsdp.train.trainer import Trainer, TrainerConfig


@dataclass
class TrainDraftConfig:
    model: str
    """HF checkpoint directory (config.json, safetensors, tokenizer); its trunk is not changed."""
    data: str
    """jsonl/parquet: one {"prompt", "response"} or {"messages": [...]} object per line (as sft)."""
    out: str = "runs/train-draft"
    """Run directory: metrics.jsonl, tensorboard, hf/ (the checkpoint with the trained draft)."""
    steps: int = 200
    """Optimizer steps of the draft."""
    global_batch_size: int = 8
    """Sequences per step, summed over all ranks."""
    max_seq_len: int = 4096
    """Longer examples (prompt + response) are truncated to this many tokens."""
    seed: int = 0
    """Seed of the data order and of sampled self-distillation continuations."""
    self_distill: bool = False
    """Train on the model's own continuations of the data's prompts (the tokens before each
    record's first trained token), generated once by the engine, instead of the data's responses."""
    max_new_tokens: int = 256
    """--self-distill: longest continuation (it stops earlier at an EOS token)."""
    temperature: float = 0.0
    """--self-distill: sampling temperature of the continuations (0 = greedy)."""
    export_hf: bool = True
    """Write the trunk with the trained draft as an HF checkpoint to <out>/hf."""
    overwrite: bool = False
    """Start over in an `out` directory that holds a run (the old one is moved aside, never deleted)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one packed micro-batch (the trunk's forward runs on it without grad)."""
    draft: DraftConfig = field(default_factory=DraftConfig)
    """The draft: n_mtp (0 = the checkpoint's, else 1 fresh module), its optimizer and loss."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sharding and compute dtype of the model (as the trainer's)."""

    def __post_init__(self):
        if not Path(self.model).is_dir():
            raise DraftConfigError(f"--model {self.model!r}: not a directory; pass an HF checkpoint directory")
        if not Path(self.data).is_file():
            raise DraftConfigError(f"--data {self.data!r}: file not found")
        if self.steps < 1 or self.global_batch_size < 1 or self.max_seq_len < 3:
            raise DraftConfigError("train-draft: --steps and --global-batch-size must be >= 1, --max-seq-len >= 3")
        if self.max_new_tokens < 2 or self.temperature < 0:
            raise DraftConfigError(f"train-draft: --max-new-tokens={self.max_new_tokens} must be >= 2 and "
                                   f"--temperature={self.temperature} >= 0 (0 = greedy)")
        if self.draft.frozen or self.draft.enabled is False:
            raise DraftConfigError("train-draft trains the draft: leave --draft.frozen and --draft.enabled unset")
        if self.max_seq_len > self.max_tokens_per_micro_batch:
            raise DraftConfigError(f"--max-seq-len {self.max_seq_len} exceeds --max-tokens-per-micro-batch "
                                   f"{self.max_tokens_per_micro_batch}; a sequence must fit one micro-batch")


def self_distilled(model_dir: str, examples: list[TrainSeq], cfg: TrainDraftConfig, eos_ids: tuple[int, ...],
                   device) -> list[TrainSeq]:
    """Each example's prompt continued by the model (engine, one process per rank generating
    a contiguous share, seed + global index), trained on the continuation. Collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = len(examples) * rank // world, len(examples) * (rank + 1) // world
    prompts = [ex.tokens[: ex.loss_mask.index(1) or 1] for ex in examples[lo:hi]]
    model = load_model(model_dir, device=device, n_mtp=0).eval()
    results = generate_from_prompts(model, prompts, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed + lo,
                                    stop_ids=eos_ids)
    local = [TrainSeq(p + r.token_ids, [0] * len(p) + [1] * len(r.token_ids)) for p, r in zip(prompts, results)]
    shares: list = [None] * world
    dist.all_gather_object(shares, local)
    return [s for share in shares for s in share]


def train_draft(cfg: TrainDraftConfig) -> list[dict]:
    """Run it; return every step's metrics (rank 0 also writes them to OUT/metrics.jsonl)."""
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = load_tokenizer(cfg.model)
    formats: set[str] = set()
    examples = load_sft_jsonl(cfg.data, tok.hf, cfg.max_seq_len, formats)
    prepare_run_dir(cfg.out, False, cfg.overwrite, None, "--out")
    if cfg.self_distill:
        examples = self_distilled(cfg.model, examples, cfg, tok.eos_token_ids, device)
    n_mtp = cfg.draft.n_mtp_for(cfg.model, fresh_default=1)
    trainer_cfg = TrainerConfig(parallel=cfg.parallel, max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch)
    trainer = Trainer(load_model(cfg.model, n_mtp=n_mtp), trainer_cfg, device=device, draft=cfg.draft,
                      train_trunk=False)
    logger = MetricsLogger(cfg.out, enabled=rank == 0)
    progress = Progress(cfg.steps, desc="train-draft", enabled=rank == 0, keys=("draft/loss", "draft/acc"))
    history = []
    steps = OneStepBehind(history, logger, progress)  # each step's metrics read once the next is queued
    try:
        while trainer.step < cfg.steps:
            seqs = batch_for_step(examples, trainer.step, cfg.global_batch_size, cfg.seed)[rank::world]
            pending = trainer.train_draft_step_async(trainer.pack(seqs))  # queued, not waited for
            steps.push(trainer.step, pending)
        steps.flush()
        if cfg.export_hf:
            export_hf(trainer.model, Path(cfg.out) / "hf")
            if rank == 0:
                record_prompt_format(Path(cfg.out) / "hf", formats.pop() if len(formats) == 1 else None)
    except BaseException:
        with contextlib.suppress(Exception):
            steps.flush()  # the last step that ran keeps its line in the log
        raise
    finally:
        progress.close()
        logger.close()
    return history
