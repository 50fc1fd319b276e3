"""Parallelism applied from outside the model: mesh, activation checkpointing, FSDP2.

`parallelize(model, mesh, cfg, device)` shows the order: AC wraps blocks first, then FSDP
shards the (wrapped) blocks and the root. Expert parallel will slot in before AC.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from miles_fsdp.parallel.ac import apply_ac
from miles_fsdp.parallel.fsdp import apply_fsdp, blocks_of
from miles_fsdp.parallel.mesh import ParallelConfig, build_mesh, dp_group, init_distributed

__all__ = [
    "ParallelConfig", "apply_ac", "apply_fsdp", "blocks_of", "build_mesh", "dp_group",
    "init_distributed", "parallelize",
]


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Shard `model` (fp32, unsharded, on CPU or `device`) in place and return it."""
    if cfg.activation_checkpointing:
        apply_ac(model)
    if not cfg.cpu_offload:
        model.to(device)
    return apply_fsdp(
        model, mesh, param_dtype=cfg.compute_dtype(device), reduce_dtype=torch.float32, cpu_offload=cfg.cpu_offload
    )
