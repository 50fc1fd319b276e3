"""`miles-fsdp eval`: held-out evaluation of an HF checkpoint with the engine (or on running
`miles-fsdp serve` instances: --servers URL ...).

Prints and writes (to --out, if given) mean reward, pass@1 and pass@k over the prompt file,
using the same rewards and sampling as RL (rl/evaluate.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch

import miles_kernels as mk
from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.data.tokenizer import load_tokenizer
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.rewards.registry import load_reward
from miles_fsdp.rl.evaluate import evaluate
from miles_fsdp.rl.remote import RemoteEngine
from miles_fsdp.rl.setup import build_engine


@dataclass
class EvalConfig:
    model: str
    """HF checkpoint directory (weights + tokenizer)."""
    data: str
    """Prompt file (.jsonl / .parquet) with prompt and label columns."""
    prompt_key: str = "prompt"
    label_key: str = "label"
    reward: str = "exact_match"
    """Built-in reward ("math", "exact_match") or `module:function` / `file.py:function`."""
    answer_extract: Literal["full", "after_marker", "last_number", "boxed"] = "last_number"
    """How exact_match reads the answer from a response."""
    n_samples: int = 1
    """Samples per prompt; pass@k is reported for k = 1 and n_samples."""
    temperature: float = 0.0
    """0 = greedy."""
    max_new_tokens: int = 256
    max_prompts: int = 0
    """Evaluate at most this many prompts (0 = all)."""
    seed: int = 0
    device: str = "auto"
    """"auto" (cuda if available), "cuda" or "cpu"."""
    kernel_mode: Literal["invariant", "fast"] = "invariant"
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_memory_bytes=256 << 20))
    servers: tuple[str, ...] = ()
    """Evaluate on running `miles-fsdp serve` instances (URLs) instead of loading the weights
    here; --model still gives the tokenizer (and should be what the servers serve)."""
    out: str = ""
    """Write the metrics as JSON here (optional)."""

    def __post_init__(self):
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("EvalConfig: n_samples and max_new_tokens must be >= 1")
        self.servers = tuple(self.servers)
        for url in self.servers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"EvalConfig.servers: {url!r} is not a URL like http://host:8000")


def main(cfg: EvalConfig) -> int:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    mk.set_mode(cfg.kernel_mode)
    tokenizer = load_tokenizer(cfg.model)
    ds = PromptDataset(DataConfig(path=cfg.data, prompt_key=cfg.prompt_key, label_key=cfg.label_key,
                                  shuffle=False), tokenizer.tokenize_prompt)
    prompts = ds.next_batch(min(len(ds), cfg.max_prompts) if cfg.max_prompts else len(ds))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = RemoteEngine(cfg.servers) if cfg.servers else build_engine(cfg.model, tokenizer, cfg.engine, dtype, device)
    options = {"extract": cfg.answer_extract} if cfg.reward == "exact_match" else {}
    metrics = evaluate(engine, tokenizer, prompts, load_reward(cfg.reward, **options), cfg.n_samples,
                       cfg.temperature, cfg.max_new_tokens, (), cfg.seed)
    print(json.dumps(metrics, indent=2))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0
