"""`miles-fsdp sft`: supervised fine-tuning (see `miles_fsdp.train.sft`).

    miles-fsdp sft --model ckpt/ --data train.jsonl --out runs/sft --steps 100
    torchrun --nproc-per-node 2 -m miles_fsdp.commands.sft --model ckpt/ --data train.jsonl
"""

from __future__ import annotations

from miles_fsdp.parallel import shutdown_distributed
from miles_fsdp.train.sft import SFTConfig, train_sft

__all__ = ["SFTConfig", "main"]


def main(cfg: SFTConfig) -> list[dict]:
    history = train_sft(cfg)
    shutdown_distributed()
    return history


if __name__ == "__main__":
    import tyro

    main(tyro.cli(SFTConfig))
