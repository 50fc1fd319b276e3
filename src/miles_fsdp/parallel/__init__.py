"""Parallelism applied from outside the model: mesh, expert parallel, activation
checkpointing, FSDP2, or on one rank no FSDP at all.

`parallelize(model, mesh, cfg, device)` shows the order (torchtitan's): expert parallel
shards the MoE experts and swaps in the all_to_all expert path, AC wraps blocks, then FSDP
shards the (wrapped) blocks and the root, leaving the EP-sharded expert weights alone. With
fsdp_units "none" (the default on one rank) the model stays plain: its forwards and
backwards run under the returned LocalParams (parallel/local.py), which casts the fp32
parameters to the compute dtype as FSDP's all-gather would.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from miles_fsdp.parallel.ac import apply_ac
from miles_fsdp.parallel.ep import apply_ep, expert_params
from miles_fsdp.parallel.fsdp import apply_fsdp, blocks_of, drop_unsynced_grads
from miles_fsdp.parallel.local import LocalParams
from miles_fsdp.parallel.mesh import (ParallelConfig, build_mesh, check_expert_parallel, dp_group,
                                      init_distributed, shutdown_distributed)

__all__ = [
    "LocalParams", "ParallelConfig", "apply_ac", "apply_ep", "apply_fsdp", "blocks_of", "build_mesh", "dp_group",
    "drop_unsynced_grads", "expert_params", "init_distributed", "parallelize", "shutdown_distributed",
]


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig,
                device: torch.device) -> tuple[nn.Module, LocalParams]:
    """Parallelize `model` (fp32, unsharded, on CPU or `device`) in place. Returns it and the
    LocalParams to run its forwards and backwards under: compute-dtype shadows of the fp32
    parameters without FSDP (fsdp_units "none"), nothing to do under FSDP."""
    if not cfg.cpu_offload:
        model.to(device)
    shard_size = mesh.size(mesh.ndim - 1)  # the shard dim (HSDP's second)
    units = cfg.units(mesh.size(), shard_size)
    ignored = None
    if cfg.expert_parallel > 1:
        check_expert_parallel(mesh, cfg.expert_parallel)
        apply_ep(model, mesh, ep_dim="shard", dp_size=mesh.size())
        ignored = expert_params(model)
    if cfg.activation_checkpointing:
        apply_ac(model)
    dtype = cfg.compute_dtype(device)
    if units == "none":
        return model, LocalParams(model, dtype if dtype != torch.float32 else None)
    model = apply_fsdp(model, mesh, param_dtype=dtype, reduce_dtype=torch.float32, cpu_offload=cfg.cpu_offload,
                       ignored_params=ignored, per_block=units == "block")
    return model, LocalParams(model, None)
