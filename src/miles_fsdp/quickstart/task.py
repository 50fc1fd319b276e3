"""The quickstart's RL task: reverse a short word, learned from imperfect demonstrations.

    prompt "rev cabhd="   correct response "dhbac"

The SFT demonstrations are deliberately noisy, as human demonstrations often are: a
fraction `echo_rate` of them answer lazily by echoing the word unreversed. SFT imitates
both behaviours, so the SFT model is decent but far from perfect (it reverses some words
and echoes others). RL with an exact-match verifier then has a clean signal: within a
group of samples of one prompt, reversals score 1 and echoes 0, and GRPO moves the
policy to always reverse. That is the RL story in miniature: the verifier fixes what the
demonstrations got wrong.

Splits are disjoint (no word in two of them) and written in the formats users give their
own data:
    sft.jsonl      {"prompt": "rev cabhd=", "response": "dhbac"}  (or the echo "cabhd")
    rl.jsonl       {"prompt": "rev cabhd=", "label": "dhbac"}
    heldout.jsonl  {"prompt": "rev cabhd=", "label": "dhbac"}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TaskConfig:
    alphabet: str = "abcdefgh"
    """Letters words are drawn from."""
    min_len: int = 3
    """Shortest word."""
    max_len: int = 5
    """Longest word."""
    echo_rate: float = 0.55
    """Fraction of SFT demonstrations that echo the word instead of reversing it."""
    num_sft: int = 4000
    num_rl: int = 2500
    num_heldout: int = 500
    seed: int = 0
    """Same seed, same files."""

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"TaskConfig: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not 0.0 <= self.echo_rate < 1.0:
            raise ValueError(f"TaskConfig.echo_rate={self.echo_rate}: must be in [0, 1)")
        words = sum(len(self.alphabet) ** n for n in range(self.min_len, self.max_len + 1))
        total = self.num_sft + self.num_rl + self.num_heldout
        if total > words // 2:
            raise ValueError(f"TaskConfig: {total} words requested but only {words} exist; "
                             "lower num_* or widen the alphabet/lengths")


def prompt_of(word: str) -> str:
    return f"rev {word}="


def write_task(out_dir: str | Path, cfg: TaskConfig) -> dict[str, Path]:
    """Write sft.jsonl, rl.jsonl and heldout.jsonl into out_dir; returns their paths."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    words: list[str] = []
    total = cfg.num_sft + cfg.num_rl + cfg.num_heldout
    while len(words) < total:
        w = "".join(rng.choice(cfg.alphabet) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    sft, rl = words[: cfg.num_sft], words[cfg.num_sft: cfg.num_sft + cfg.num_rl]
    held = words[cfg.num_sft + cfg.num_rl:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        "sft": [{"prompt": prompt_of(w), "response": w if rng.random() < cfg.echo_rate else w[::-1]} for w in sft],
        "rl": [{"prompt": prompt_of(w), "label": w[::-1]} for w in rl],
        "heldout": [{"prompt": prompt_of(w), "label": w[::-1]} for w in held],
    }
    paths = {}
    for name, recs in rows.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths
