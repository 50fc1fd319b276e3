"""The quickstart's measured settings, and the SFT / RL configs of its two stages.

Measured on the 2-core CPU machine (torch 2.13, invariant kernels, seed 0):
    full  (300 SFT steps, 40 GRPO steps): held-out greedy accuracy 26.5% after SFT,
          95% after 10 RL steps, 97.5-99.5% after 20-40; 166 s wall with the MTP draft
          (SFT 96 s), 113 s without (--num-speculative-tokens 0: SFT 71 s)
    short (150 SFT steps, 12 GRPO steps): 29.7% -> 56.2%, ~50 s wall idle (CI)
The draft changes no policy bit: both columns are the same with and without it.
Addition (2-digit, clean demonstrations) was measured too and dropped: after 1-2 minutes of
SFT the errors are missing skill (carries), which 100 GRPO steps at this size did not fix
(+5.5 points at best); the noisy-demonstration task isolates what RL is good at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.quickstart.model import TinyModelConfig
from miles_fsdp.quickstart.task import TaskConfig
from miles_fsdp.rl.config import EvalConfig, RLConfig, RolloutConfig
from miles_fsdp.train.draft import DraftConfig
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.sft import SFTConfig
from miles_fsdp.train.trainer import TrainerConfig


@dataclass
class QuickstartPreset:
    task: TaskConfig
    model: TinyModelConfig
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    rl_steps: int = 40
    rl_prompts: int = 16
    """Prompts per RL step (each sampled rl_samples times)."""
    rl_samples: int = 8
    rl_lr: float = 3e-4
    eval_every: int = 10
    """Held-out eval every this many RL steps (plus before and after)."""
    eval_prompts: int = 200
    spec_tokens: int = 2
    """Draft tokens per step (engine.num_speculative_tokens) of RL's rollouts and evals; the
    MTP draft trains in SFT and online in RL (0 = no draft, no speculation)."""
    draft_lr: float = 1e-3
    """The draft's own AdamW LR in RL (in SFT it follows the policy's schedule)."""


def quickstart_preset(short: bool = False, seed: int = 0) -> QuickstartPreset:
    """A 2-layer d=128 Qwen3 (~0.5M parameters) on the reverse task; short=True for CI."""
    if short:
        return QuickstartPreset(TaskConfig(num_sft=2000, num_rl=500, num_heldout=64, seed=seed),
                                TinyModelConfig(seed=seed), sft_steps=150, rl_steps=12, eval_every=0,
                                eval_prompts=64)
    return QuickstartPreset(TaskConfig(seed=seed), TinyModelConfig(seed=seed))


def sft_config(p: QuickstartPreset, init_dir: Path, data_dir: Path, out: Path) -> SFTConfig:
    """Stage 1: SFT from the fresh checkpoint on data_dir/sft.jsonl, exported to out/hf."""
    optim = OptimConfig(lr=p.sft_lr, warmup_steps=min(20, p.sft_steps // 5), schedule="cosine",
                        total_steps=p.sft_steps, min_lr_ratio=0.1)
    draft = DraftConfig(n_mtp=1, optim=optim) if p.spec_tokens else DraftConfig()
    return SFTConfig(model=str(init_dir), data=str(Path(data_dir) / "sft.jsonl"), out=str(out), steps=p.sft_steps,
                     global_batch_size=p.sft_batch, max_seq_len=p.model.max_position_embeddings,
                     seed=p.task.seed, trainer=TrainerConfig(optim=optim), draft=draft)


def rl_config(p: QuickstartPreset, model_dir: Path, data_dir: Path, run_dir: Path) -> RLConfig:
    """Stage 2: GRPO (true on-policy) from the SFT model, exact-match reward, held-out eval."""
    data_dir = Path(data_dir)
    return RLConfig(
        model=str(model_dir),
        data=DataConfig(path=str(data_dir / "rl.jsonl"), prompts_per_batch=p.rl_prompts, num_epochs=100,
                        seed=p.task.seed),
        run_dir=str(run_dir), steps=p.rl_steps, seed=p.task.seed,
        rollout=RolloutConfig(n_samples_per_prompt=p.rl_samples, max_new_tokens=8, reward="exact_match",
                              answer_extract="full"),
        trainer=TrainerConfig(optim=OptimConfig(lr=p.rl_lr, warmup_steps=0)),
        engine=engine_config(p),
        draft=DraftConfig(optim=OptimConfig(lr=p.draft_lr, warmup_steps=0)),
        eval=EvalConfig(path=str(data_dir / "heldout.jsonl"), every=p.eval_every, max_prompts=p.eval_prompts),
    )


def engine_config(p: QuickstartPreset, spec_tokens: int | None = None) -> EngineConfig:
    """RL's engine (rollouts and evals); spec_tokens overrides p.spec_tokens."""
    k = p.spec_tokens if spec_tokens is None else spec_tokens
    return EngineConfig(kv_memory_bytes=64 << 20, cuda_graphs=False, num_speculative_tokens=k)
