"""`miles-fsdp eval`: held-out evaluation of an HF checkpoint with the engine (or on running
`miles-fsdp serve` instances: --servers URL ...).

Prints and writes (to --out, if given) mean reward, pass@1 and pass@k over the prompt file,
using the same rewards and sampling as RL (rl/evaluate.py). Defaults adapt to the model and
the data, and each choice is logged to stderr: responses are as long as fit the model's
context (at most 256 tokens), and exact_match compares the whole response with the label
unless every label is a number (then the response's last number).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Literal

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.data.sample import Sample
from miles_fsdp.data.tokenizer import load_tokenizer
from miles_fsdp.device import check_device, resolve_device, resolve_dtype
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.errors import UserError
from miles_fsdp.models import ModelArgs
from miles_fsdp.rewards.exact_match import extract_answer
from miles_fsdp.rewards.registry import load_reward
from miles_fsdp.rl.evaluate import evaluate
from miles_fsdp.engine.remote import RemoteEngine
from miles_fsdp.rl.run import build_engine

DEFAULT_MAX_NEW_TOKENS = 256


class EvalError(UserError, ValueError):
    """Settings that do not fit the model or the data; the message says what to change."""


@dataclass
class EvalCommandConfig:
    """The `eval` command's settings (the RL loop's periodic eval is rl.config.EvalConfig)."""

    model: str
    """HF checkpoint directory (weights + tokenizer)."""
    data: str
    """Prompt file (.jsonl / .parquet) with prompt and label columns."""
    prompt_key: str = "prompt"
    label_key: str = "label"
    reward: str = "exact_match"
    """Built-in reward ("math", "exact_match") or `module:function` / `file.py:function`."""
    answer_extract: Literal["auto", "full", "after_marker", "last_number", "boxed"] = "auto"
    """How exact_match reads the answer from a response: the whole response, the text after
    '####', the last number, the last \\boxed{}; "auto" = last_number when every label is a
    number, else full."""
    n_samples: int = 1
    """Samples per prompt; pass@k is reported for k = 1 and n_samples."""
    temperature: float = 0.0
    """0 = greedy."""
    max_new_tokens: int = 0
    """Longest response; 0 = 256, capped so that the longest prompt plus the response fits the
    model's context (max_position_embeddings, or --engine.max-model-len)."""
    max_prompts: int = 0
    """Evaluate at most this many prompts (0 = all)."""
    seed: int = 0
    device: str = "auto"
    """"auto" (cuda if available), "cuda" or "cpu"."""
    kernel_mode: Literal["invariant", "fast"] = "invariant"
    """miles_kernels mode of the local engine (servers run their own --kernel-mode)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    servers: tuple[str, ...] = ()
    """Evaluate on running `miles-fsdp serve` instances (URLs) instead of loading the weights
    here; --model still gives the tokenizer (and should be what the servers serve)."""
    out: str = ""
    """Write the metrics as JSON here (optional)."""

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"--n-samples {self.n_samples}: must be >= 1 (samples per prompt)")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1, or 0 for what fits the context")
        if self.max_prompts < 0:
            raise ValueError(f"--max-prompts {self.max_prompts}: must be >= 1, or 0 to evaluate every prompt")
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        check_device(self.device, "--device")
        self.servers = tuple(self.servers)
        for url in self.servers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--servers: {url!r} is not a URL like http://host:8000")


def main(cfg: EvalCommandConfig) -> int:
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    ds = PromptDataset(DataConfig(path=cfg.data, prompt_key=cfg.prompt_key, label_key=cfg.label_key,
                                  shuffle=False), tokenizer.tokenize_prompt)
    prompts = ds.next_batch(min(len(ds), cfg.max_prompts) if cfg.max_prompts else len(ds))
    max_new_tokens = fit_max_new_tokens(cfg, prompts)
    options = {"extract": answer_extract(cfg, prompts)} if cfg.reward == "exact_match" else {}
    engine = (RemoteEngine(cfg.servers) if cfg.servers else
              build_engine(cfg.model, tokenizer, cfg.engine, resolve_dtype("auto", device), device, cfg.kernel_mode))
    metrics = evaluate(engine, tokenizer, prompts, load_reward(cfg.reward, **options), cfg.n_samples,
                       cfg.temperature, max_new_tokens, (), cfg.seed)
    print(json.dumps(metrics, indent=2))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(metrics, f, indent=2)
    if metrics["eval/reward_errors"] == cfg.n_samples * len(prompts):
        print(f"eval: the reward {cfg.reward!r} raised on every sample (warnings above), so the mean reward "
              "means nothing; fix the reward or the label column (--label-key)", file=sys.stderr)
        return 1
    return 0


def fit_max_new_tokens(cfg: EvalCommandConfig, prompts: list[Sample]) -> int:
    """--max-new-tokens, or (0) the default capped to the model's context; says which."""
    context = cfg.engine.max_model_len or ModelArgs.from_hf(cfg.model).max_position_embeddings
    source = "--engine.max-model-len" if cfg.engine.max_model_len else "max_position_embeddings in config.json"
    longest = max(len(s.prompt_ids) for s in prompts)
    room = context - longest
    if cfg.max_new_tokens:
        if cfg.max_new_tokens > room:
            raise EvalError(f"--max-new-tokens {cfg.max_new_tokens}: the longest prompt ({longest} tokens) plus "
                             f"the response must fit the model's context of {context} tokens ({source}); "
                             f"use --max-new-tokens {room} or less (or 0 for what fits)")
        return cfg.max_new_tokens
    if room < 1:
        raise EvalError(f"{cfg.data}: the longest prompt ({longest} tokens) fills the model's context of {context} "
                         f"tokens ({source}), leaving no room for a response; shorten the prompts")
    n = min(DEFAULT_MAX_NEW_TOKENS, room)
    why = "the default" if n == DEFAULT_MAX_NEW_TOKENS else (
        f"{DEFAULT_MAX_NEW_TOKENS} capped to the model's context of {context} tokens minus the longest prompt, "
        f"{longest}")
    print(f"eval: responses of at most {n} tokens ({why}); set --max-new-tokens to change", file=sys.stderr)
    return n


def answer_extract(cfg: EvalCommandConfig, prompts: list[Sample]) -> str:
    """--answer-extract, or (auto) last_number when every label is a number, else full; says which."""
    if cfg.answer_extract != "auto":
        return cfg.answer_extract
    # a label is a number when its last number is all of it ("42", "-1,000", "3.5")
    numeric = all(s.label is not None and extract_answer(s.label, "last_number") == s.label.strip() for s in prompts)
    how, why = ("last_number", "every label is a number") if numeric else ("full", "not every label is a number")
    print(f"eval: exact_match compares {'the last number of' if numeric else 'the whole'} response with the label "
          f"(--answer-extract {how}: {why}); set --answer-extract to change", file=sys.stderr)
    return how
