"""Measured settings of the quickstart: task, model size, SFT and RL budgets.

`quickstart_preset()` is the newcomer's run; `quickstart_preset(short=True)` the CI smoke
run (well under 2 minutes). `sft_config(...)` / `rl_config(...)` turn a preset into the
SFTConfig / RLConfig of its stages.

Measurements (2-core shared CPU, torch 2.13, 1 thread, invariant kernels), 2-digit
addition, 5000 SFT examples, held-out = 200 prompts of heldout.jsonl, greedy decoding:
    SFT (batch 64, lr 3e-3, cosine, warmup 20)   steps 150: 4%   300: 34% (41 s)
                                                 450: 48%   600: 56% (110 s)
    3-digit operands, same model: 800 steps -> 10% (195 s): too hard for minutes of CPU.
    Answer digits reversed (least significant first): 300 steps -> 2%: no help here.
    (SFT measured with Trainer + sft_loss on random batches, the same step train_sft runs.)
    RL after the 300-step SFT (GRPO, 32 prompts x 8 samples, ~1.5 s/step, 200 held-out prompts):
        lr 1e-4, 40 steps, T=1      training reward flat (~0.25); held-out greedy 34% -> 32%
        lr 3e-4, 100 steps, T=1     training reward 0.20 -> 0.32 (10-step means);
                                    held-out greedy 34% -> 31% (flat within noise)
        lr 3e-4, 150 steps, T=1     held-out sampled pass@1 (T=1, 4 samples) 16.5% -> 23% at
                                    step 111 -> 18% at 150 (noisy, no robust gain)
        lr 3e-4, rollout T=0.7      held-out greedy 34% -> 21% by step 50, reward falls late
        lr 1e-3 (warmup 0 or 30)    collapses (reward -> 0 by step 10, or ~0.05 by step 50)
    Loop sanity on the same checkpoint: a reward for "response starts with 1" goes 0.6 -> 0.99
    in 12 steps at lr 3e-4, so the loop learns; addition is just slow for RL at this size.
    Trainer/rollout log-prob diff was exactly 0 at every step of every run.
    RL after the 600-step SFT (the preset), lr 3e-4, 100 steps, T=1 (87 s):
        training reward 0.66 -> 0.75-0.80 (10-step means); held-out greedy 56% -> 61.5%
        (54%, 53.5%, 61.5%, 61.5% at steps 25/50/75/100).
    Not met yet: RL adding >= 15 points of held-out accuracy within minutes (best: +5.5 greedy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from miles_fsdp.quickstart.model import TinyModelConfig
from miles_fsdp.quickstart.task import TaskConfig


@dataclass
class SFTSettings:
    steps: int = 600
    """Optimizer steps (~70-110 s on 2 shared CPU cores; 56% held-out greedy accuracy)."""
    batch_size: int = 64
    """Sequences (prompt + response + EOS, loss on the response) per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 20
    """Linear warmup, then cosine decay to min_lr_ratio * lr at `steps`."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""


@dataclass
class RLSettings:
    steps: int = 100
    """GRPO steps."""
    prompts_per_batch: int = 32
    """Prompts per step."""
    n_samples_per_prompt: int = 8
    """Group size."""
    lr: float = 3e-4
    """AdamW learning rate (1e-3 collapsed the policy in our runs)."""
    temperature: float = 1.0
    """Rollout temperature (the trainer scores at the same one)."""
    max_new_tokens: int = 8
    """Longest answer: 3 digits + EOS, with room for rambling."""
    eval_every: int = 25
    """Held-out evaluation every this many steps (plus before and after)."""
    eval_prompts: int = 200
    """Held-out prompts evaluated."""
    eval_temperature: float = 0.0
    """0 = greedy accuracy; > 0 samples `eval_samples` answers per prompt."""
    eval_samples: int = 1
    """Samples per held-out prompt (pass@1 is their mean)."""


@dataclass
class QuickstartPreset:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    sft: SFTSettings = field(default_factory=SFTSettings)
    rl: RLSettings = field(default_factory=RLSettings)


def quickstart_preset(short: bool = False) -> QuickstartPreset:
    """2-digit addition, a 2-layer d=128 Qwen3 (~0.5M parameters), ~1.5 min SFT, ~2 min RL.

    short=True: the same pipeline at toy size for CI (seconds per stage, accuracy not meaningful)."""
    preset = QuickstartPreset(
        task=TaskConfig(min_digits=1, max_digits=2, num_sft=5000, num_rl=2000, num_heldout=500),
        model=TinyModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512),
        sft=SFTSettings(),
        rl=RLSettings(),
    )
    if short:
        preset.task = TaskConfig(min_digits=1, max_digits=2, num_sft=256, num_rl=64, num_heldout=16)
        preset.model = TinyModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128)
        preset.sft = SFTSettings(steps=10, batch_size=16, warmup_steps=2)
        preset.rl = RLSettings(steps=2, prompts_per_batch=4, n_samples_per_prompt=4, eval_every=0,
                               eval_prompts=16, eval_samples=1)
    return preset


def sft_config(preset: QuickstartPreset, model_dir: str | Path, data_dir: str | Path, out: str | Path):
    """The SFT stage: from the fresh checkpoint `model_dir` on data_dir/sft.jsonl; the trained
    model is exported to out/hf (the RL stage's `model_dir`)."""
    from miles_fsdp.train.optim import OptimConfig
    from miles_fsdp.train.sft import SFTConfig
    from miles_fsdp.train.trainer import TrainerConfig

    sft = preset.sft
    optim = OptimConfig(lr=sft.lr, warmup_steps=sft.warmup_steps, schedule="cosine", total_steps=sft.steps,
                        min_lr_ratio=sft.min_lr_ratio)
    return SFTConfig(
        model=str(model_dir), data=str(Path(data_dir) / "sft.jsonl"), out=str(out), steps=sft.steps,
        global_batch_size=sft.batch_size, max_seq_len=preset.model.max_position_embeddings,
        seed=preset.task.seed, trainer=TrainerConfig(optim=optim),
    )


def rl_config(preset: QuickstartPreset, model_dir: str | Path, data_dir: str | Path, run_dir: str | Path):
    """The RL stage: GRPO from the SFT checkpoint `model_dir` on data_dir/rl.jsonl, evaluated on
    data_dir/heldout.jsonl, rewarded by the built-in exact match (last number of the response)."""
    from miles_fsdp.data.datasets import DataConfig
    from miles_fsdp.engine.config import EngineConfig
    from miles_fsdp.rl.config import AlgoConfig, EvalConfig, RLConfig, RolloutConfig
    from miles_fsdp.train.optim import OptimConfig
    from miles_fsdp.train.trainer import TrainerConfig

    rl, data_dir = preset.rl, Path(data_dir)
    return RLConfig(
        model=str(model_dir),
        data=DataConfig(path=str(data_dir / "rl.jsonl"), prompts_per_batch=rl.prompts_per_batch, num_epochs=1000),
        run_dir=str(run_dir),
        steps=rl.steps,
        rollout=RolloutConfig(n_samples_per_prompt=rl.n_samples_per_prompt, temperature=rl.temperature,
                              max_new_tokens=rl.max_new_tokens, reward="exact_match"),
        algo=AlgoConfig(advantage="grpo"),
        trainer=TrainerConfig(optim=OptimConfig(lr=rl.lr, warmup_steps=0)),
        engine=EngineConfig(kv_memory_bytes=64 << 20, cuda_graphs=False),
        eval=EvalConfig(path=str(data_dir / "heldout.jsonl"), every=rl.eval_every, max_prompts=rl.eval_prompts,
                        temperature=rl.eval_temperature, n_samples=rl.eval_samples),
    )
