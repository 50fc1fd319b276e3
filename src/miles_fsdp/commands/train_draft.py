"""`miles-fsdp train-draft`: train only the MTP draft of a checkpoint (see `miles_fsdp.train.train_draft`).

    miles-fsdp train-draft --model ckpt/ --data train.jsonl --out runs/draft
    miles-fsdp train-draft --model ckpt/ --data prompts.jsonl --self-distill --max-new-tokens 128
"""

from __future__ import annotations

from miles_fsdp.parallel import shutdown_distributed
from miles_fsdp.train.train_draft import TrainDraftConfig, train_draft

__all__ = ["TrainDraftConfig", "main"]


def main(cfg: TrainDraftConfig) -> list[dict]:
    history = train_draft(cfg)
    shutdown_distributed()
    return history


if __name__ == "__main__":
    import tyro

    main(tyro.cli(TrainDraftConfig))
