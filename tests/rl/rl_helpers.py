"""Shared by the tests/rl tests: the `miles-fsdp rl` command line of the tiny runs."""

import sys
from pathlib import Path


def rl_cmd(root: Path, ckpt: Path, data: Path, run: Path, steps: int, *extra: str, ranks: int = 1) -> list[str]:
    """`python -m miles_fsdp.cli rl ...` (under torchrun --standalone when ranks > 1): 4 prompts
    x 4 samples x 6 new tokens per step, the test reward in root/my_reward.py."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                                 if ranks > 1 else [])
    return [*launch, "-m", "miles_fsdp.cli", "rl", "--model", str(ckpt), "--data.path", str(data),
            "--data.prompts-per-batch", "4", "--steps", str(steps), "--rollout.n-samples-per-prompt", "4",
            "--rollout.max-new-tokens", "6", "--rollout.reward", f"{root}/my_reward.py:reward",
            "--run-dir", str(run), *extra]
