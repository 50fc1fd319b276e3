"""`miles-fsdp convert`: a DCP training checkpoint (one step_* directory) -> HF checkpoint.

    miles-fsdp convert --checkpoint runs/sft/checkpoints/step_00000100 --out runs/sft/hf100

Runs in one process without torch.distributed: DCP reads the model shards of every rank
into a full CPU model. The step directory carries config.json and tokenizer files
(written by `save_checkpoint`), so nothing else is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from miles_fsdp.device import DTYPES
from miles_fsdp.models import ModelArgs, Transformer, save_hf
from miles_fsdp.train.checkpoint import CheckpointError


@dataclass
class ConvertConfig:
    checkpoint: str = ""
    """A step_* directory written by the trainer (contains .metadata and config.json)."""
    out: str = ""
    """Output HF directory (created)."""
    dtype: str = "bfloat16"
    """Saved dtype: bfloat16, float32 or float16."""

    def __post_init__(self):
        if not self.checkpoint or not self.out:
            raise ValueError("ConvertConfig: pass both --checkpoint STEP_DIR and --out DIR")
        if self.dtype not in DTYPES:
            raise ValueError(f"ConvertConfig.dtype={self.dtype!r}: use one of {sorted(DTYPES)}")


def main(cfg: ConvertConfig) -> Path:
    path = Path(cfg.checkpoint)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a DCP checkpoint (no .metadata); pass one step_* directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json next to the checkpoint; it was not written by save_checkpoint")
    args = ModelArgs.from_hf(path)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path))  # fills the tensors in place
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"{path}: cannot read the model from this checkpoint ({type(e).__name__}: {e})") from e
    return save_hf(model, cfg.out, dtype=DTYPES[cfg.dtype])


if __name__ == "__main__":
    import tyro

    main(tyro.cli(ConvertConfig))
