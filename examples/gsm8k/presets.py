"""GSM8K RL presets for Qwen3 checkpoints: Python functions returning an RLConfig.

Each preset is a base the command line edits (`train.py <preset> --steps 50 ...`); a
variant calls its base and changes a few fields. Sizing (H100/H200 80-141 GB):
    qwen3_0p6b  1 GPU          fp32 master + AdamW ~10 GB
    qwen3_4b    2+ GPUs        ~64 GB of master weights + optimizer state, sharded by FSDP2
    qwen3_8b    4-8 GPUs       ~128 GB sharded; activation checkpointing on
`prompts_per_batch` is global: each rank takes prompts_per_batch / world_size prompts.
"""

from __future__ import annotations

from miles_fsdp.data.datasets import DataConfig
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.parallel import ParallelConfig
from miles_fsdp.rl.config import AlgoConfig, EvalConfig, RLConfig, RolloutConfig
from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.trainer import TrainerConfig

TRAIN_DATA = "data/gsm8k_train.jsonl"
TEST_DATA = "data/gsm8k_test.jsonl"


def qwen3_0p6b(model: str = "checkpoints/Qwen3-0.6B", train: str = TRAIN_DATA, test: str = TEST_DATA) -> RLConfig:
    """GRPO on GSM8K, 8 samples per prompt, 32 prompts per step, answers graded by math-verify."""
    return RLConfig(
        model=model,
        data=DataConfig(path=train, prompts_per_batch=32, max_prompt_len=512, num_epochs=10),
        run_dir="runs/gsm8k_qwen3_0p6b",
        steps=200,
        rollout=RolloutConfig(n_samples_per_prompt=8, temperature=1.0, max_new_tokens=1024, reward="math"),
        algo=AlgoConfig(advantage="grpo", eps_low=0.2, eps_high=0.28),
        trainer=TrainerConfig(
            optim=OptimConfig(lr=1e-6, weight_decay=0.01, grad_clip=1.0, warmup_steps=5),
            parallel=ParallelConfig(param_dtype="auto"),
            max_tokens_per_micro_batch=16384,
        ),
        # colocated with the trainer: leave room for its weights, grads and optimizer state
        engine=EngineConfig(kv_memory_bytes=0, kv_memory_fraction=0.5, max_num_seqs=256),
        eval=EvalConfig(path=test, every=20, max_prompts=500, temperature=0.0),
        checkpoint_every=50,
    )


def qwen3_4b(model: str = "checkpoints/Qwen3-4B", train: str = TRAIN_DATA, test: str = TEST_DATA) -> RLConfig:
    cfg = qwen3_0p6b(model, train, test)
    cfg.run_dir = "runs/gsm8k_qwen3_4b"
    cfg.data.prompts_per_batch = 64
    cfg.trainer.parallel.activation_checkpointing = True
    cfg.trainer.max_tokens_per_micro_batch = 12288
    cfg.engine.kv_memory_fraction = 0.4
    return cfg


def qwen3_8b(model: str = "checkpoints/Qwen3-8B", train: str = TRAIN_DATA, test: str = TEST_DATA) -> RLConfig:
    cfg = qwen3_4b(model, train, test)
    cfg.run_dir = "runs/gsm8k_qwen3_8b"
    cfg.data.prompts_per_batch = 128
    cfg.trainer.max_tokens_per_micro_batch = 8192
    cfg.engine.kv_memory_fraction = 0.3
    return cfg


PRESETS = {
    "qwen3-0.6b": (qwen3_0p6b.__doc__.split("\n")[0], qwen3_0p6b),
    "qwen3-4b": ("qwen3-0.6b scaled to 4B: 64 prompts/step, activation checkpointing", qwen3_4b),
    "qwen3-8b": ("qwen3-4b scaled to 8B: 128 prompts/step, smaller micro-batches", qwen3_8b),
}
