"""`miles-fsdp rl`: GRPO-family RL with the in-process engine (see miles_fsdp.rl.loop)."""

from __future__ import annotations

import logging

from miles_fsdp.parallel import shutdown_distributed
from miles_fsdp.rl.config import RLConfig
from miles_fsdp.rl.loop import run_rl

__all__ = ["RLConfig", "main"]


def main(cfg: RLConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_rl(cfg)
    shutdown_distributed()
    return 0
