"""Model in and out: load an HF checkpoint into an unsharded Transformer, and export the
(sharded) trained model back to an HF directory that transformers can load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from miles_fsdp.models import ModelArgs, Transformer, load_hf, save_hf


def load_model(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Transformer with the weights of `hf_dir`, fp32 on CPU (ready for `parallelize`)."""
    args = ModelArgs.from_hf(hf_dir)
    with torch.device("meta"):
        model = Transformer(args)
    return load_hf(model, hf_dir, dtype=dtype)


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
