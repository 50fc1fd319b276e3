"""Shared by the tests/rl tests: the `miles-fsdp rl` command line of the tiny runs."""

import sys
from pathlib import Path


def rl_args(root: Path, ckpt: Path, data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """`-m miles_fsdp.cli rl ...` (for python, or tests/torchrun.py): 4 prompts x 4 samples x 6 new
    tokens per step, the test reward in root/my_reward.py."""
    return ["-m", "miles_fsdp.cli", "rl", "--model", str(ckpt), "--data.path", str(data),
            "--data.prompts-per-batch", "4", "--steps", str(steps), "--rollout.n-samples-per-prompt", "4",
            "--rollout.max-new-tokens", "6", "--rollout.reward", f"{root}/my_reward.py:reward",
            "--run-dir", str(run), *extra]


def rl_cmd(root: Path, ckpt: Path, data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """`python -m miles_fsdp.cli rl ...` in one process (rl_args)."""
    return [sys.executable, *rl_args(root, ckpt, data, run, steps, *extra)]
