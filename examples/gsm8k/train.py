"""Run a GSM8K preset, any field overridable from the command line (tyro):

    python examples/gsm8k/train.py qwen3-0.6b --model /ckpt/Qwen3-0.6B --steps 50
    torchrun --nproc-per-node 8 examples/gsm8k/train.py qwen3-8b --model /ckpt/Qwen3-8B
    python examples/gsm8k/train.py qwen3-0.6b --help        # every field with its docstring
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
from presets import PRESETS  # noqa: E402

from miles_fsdp.rl.loop import run_rl  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    configs = {name: (desc, fn()) for name, (desc, fn) in PRESETS.items()}
    cfg = tyro.extras.overridable_config_cli(configs, args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_rl(cfg)


if __name__ == "__main__":
    main()
