"""The quickstart task: multi-digit addition, generated from a seed, graded by exact match.

    prompt "47+385="   response / label "432"

Three disjoint splits (no (a, b) pair appears in two of them), written in the formats users
give their own data:
    sft.jsonl      {"prompt": "47+385=", "response": "432"}   supervised fine-tuning
    rl.jsonl       {"prompt": "47+385=", "label": "432"}      RL prompts (DataConfig defaults)
    heldout.jsonl  {"prompt": "47+385=", "label": "432"}      evaluation

Why addition: a tiny model learns the format and the easy digits within minutes, while
carries keep it far from perfect; the answer is checkable, so RL has a clean reward.
Difficulty knobs: `min_digits`/`max_digits` (operand lengths).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("sft", "rl", "heldout")


@dataclass
class TaskConfig:
    min_digits: int = 1
    """Fewest digits of an operand."""
    max_digits: int = 3
    """Most digits of an operand (the answer has at most one more)."""
    num_sft: int = 20000
    """Examples in sft.jsonl."""
    num_rl: int = 5000
    """Prompts in rl.jsonl."""
    num_heldout: int = 500
    """Prompts in heldout.jsonl."""
    seed: int = 0
    """Same seed, same files."""

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"TaskConfig: need 1 <= min_digits <= max_digits, got min_digits={self.min_digits}, "
                f"max_digits={self.max_digits}"
            )
        for name in ("num_sft", "num_rl", "num_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.total > self.num_pairs:
            raise ValueError(
                f"TaskConfig: {self.total} examples requested but only {self.num_pairs} distinct pairs exist "
                f"with {self.min_digits}-{self.max_digits} digit operands; raise max_digits or lower num_*"
            )

    @property
    def total(self) -> int:
        return self.num_sft + self.num_rl + self.num_heldout

    @property
    def num_pairs(self) -> int:
        lo, hi = _operand_range(self.min_digits, self.max_digits)
        return (hi - lo + 1) ** 2


def _operand_range(min_digits: int, max_digits: int) -> tuple[int, int]:
    return (0 if min_digits == 1 else 10 ** (min_digits - 1)), 10**max_digits - 1


def _random_operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    # digits first, then the number: short operands are as common as long ones
    d = rng.randint(min_digits, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def make_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def make_splits(cfg: TaskConfig) -> dict[str, list[tuple[int, int]]]:
    """Split name -> (a, b) pairs; deterministic in cfg, pairs distinct across all splits."""
    rng = random.Random(cfg.seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < cfg.total:
        pair = (_random_operand(rng, cfg.min_digits, cfg.max_digits), _random_operand(rng, cfg.min_digits, cfg.max_digits))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    # held-out first, so growing num_sft does not change the evaluation set
    h, r = cfg.num_heldout, cfg.num_rl
    return {"heldout": pairs[:h], "rl": pairs[h : h + r], "sft": pairs[h + r :]}


def records(split: str, pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """The jsonl rows of one split (see the module docstring for the keys)."""
    key = "response" if split == "sft" else "label"
    return [{"prompt": make_prompt(a, b), key: str(a + b)} for a, b in pairs]


def write_task(out_dir: str | Path, cfg: TaskConfig) -> dict[str, Path]:
    """Write sft.jsonl, rl.jsonl and heldout.jsonl into out_dir; returns split -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, pairs in make_splits(cfg).items():
        path = out_dir / f"{split}.jsonl"
        with open(path, "w") as f:
            for row in records(split, pairs):
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return {s: paths[s] for s in SPLITS}
