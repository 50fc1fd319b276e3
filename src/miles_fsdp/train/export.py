"""Export the (sharded) trained model to an HF directory that transformers can load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from miles_fsdp.models import save_hf


def export_hf(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Gather the full state dict on rank 0 (CPU) and write it with `save_hf`. Collective;
    returns the path on rank 0, None elsewhere."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    path = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = save_hf(state, out_dir, args=model.args, dtype=dtype)
    if dist.is_initialized():
        dist.barrier()
    return path
