"""Process group and device mesh.

Under torchrun (RANK/WORLD_SIZE set) we join the launched group: NCCL on CUDA, gloo on
CPU. As a plain `python` process we create a 1-rank group on an in-memory store, so the
same FSDP2 code path runs on a laptop with no launcher.

Mesh: 1-D ("shard",) for FSDP, 2-D ("replicate", "shard") for HSDP. Expert parallelism
reuses the "shard" dim (see parallel/ep.py), so it adds no mesh dim.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from miles_fsdp.device import resolve_dtype


@dataclass
class ParallelConfig:
    replicate: int = 1
    """HSDP replicate degree: ranks are split into `replicate` groups that each hold a full
    FSDP-sharded copy (shard degree = world_size / replicate). 1 = plain FSDP."""
    expert_parallel: int = 1
    """EP degree for MoE models: each rank holds num_experts / expert_parallel experts and
    tokens reach them by all_to_all. Must be 1 or the shard degree (world_size / replicate):
    EP shards experts over the FSDP shard dim (the other params stay FSDP-sharded there)."""
    param_dtype: str = "auto"
    """Compute dtype of parameters: "bf16" (fp32 master, bf16 compute, fp32 grad reduce),
    "fp32" (end to end), or "auto" (bf16 on CUDA, fp32 on CPU)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward (saves activations, ~+30% compute)."""
    cpu_offload: bool = False
    """Keep sharded parameters, grads and optimizer state on the CPU (FSDP2 CPUOffloadPolicy)."""
    fsdp_units: str = "auto"
    """FSDP2 units: "block" (one per transformer block and draft module, then the root: peak
    parameter memory of one block), "model" (one unit: the whole model's compute-dtype
    parameters stay gathered through forward and backward, and the per-block hooks, copies
    and collectives are gone), "none" (no FSDP, one rank only: the plain model keeps its fp32
    parameters and runs on compute-dtype copies of them, parallel/local.py; the bits of "model"
    without FSDP's per-parameter work), "auto" ("none" on one rank without cpu_offload; else
    "model" when the parameters are not sharded at all, i.e. one rank per replica and no
    cpu_offload; else "block")."""

    def __post_init__(self):
        if self.replicate < 1:
            raise ValueError(f"ParallelConfig.replicate={self.replicate}: must be >= 1")
        if self.expert_parallel < 1:
            raise ValueError(f"ParallelConfig.expert_parallel={self.expert_parallel}: must be >= 1")
        if self.expert_parallel > 1 and self.cpu_offload:
            raise ValueError("ParallelConfig.expert_parallel > 1 does not support cpu_offload=True; turn one off")
        if self.param_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"ParallelConfig.param_dtype={self.param_dtype!r}: use 'auto', 'bf16' or 'fp32'")
        if self.fsdp_units not in ("auto", "block", "model", "none"):
            raise ValueError(f"ParallelConfig.fsdp_units={self.fsdp_units!r}: use 'auto', 'block', 'model' or 'none'")
        if self.fsdp_units == "model" and self.cpu_offload:
            raise ValueError("ParallelConfig.fsdp_units='model' keeps every parameter gathered on the device, which "
                             "cpu_offload=True is there to avoid: use fsdp_units='block' (or 'auto')")
        if self.fsdp_units == "none" and self.cpu_offload:
            raise ValueError("ParallelConfig.fsdp_units='none' runs without FSDP, whose offload policy "
                             "cpu_offload=True is: use fsdp_units='block' (or 'auto'), or turn cpu_offload off")
        if self.fsdp_units == "none" and (self.expert_parallel > 1 or self.replicate > 1):
            raise ValueError(f"ParallelConfig.fsdp_units='none' runs on one rank, without FSDP; expert_parallel="
                             f"{self.expert_parallel} and replicate={self.replicate} need several: set both to 1, "
                             f"or use fsdp_units='auto'")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.param_dtype, device)

    def units(self, ranks: int, shard_size: int) -> str:
        """The FSDP units, "none", "model" or "block" (`fsdp_units`, "auto" resolved), on a mesh
        of `ranks` ranks whose parameters are sharded over `shard_size` of them."""
        if self.fsdp_units == "none" and ranks > 1:
            raise ValueError(f"ParallelConfig.fsdp_units='none' trains without FSDP, so on one rank; this run has "
                             f"{ranks}: use fsdp_units='auto' (or 'model' or 'block')")
        if self.fsdp_units != "auto":
            return self.fsdp_units
        if self.cpu_offload:
            return "block"
        if ranks == 1 and self.expert_parallel == 1:
            return "none"
        return "model" if shard_size == 1 else "block"


def init_distributed() -> torch.device:
    """Join (or create) the default process group; return this rank's device."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device
    # gloo beside NCCL: small host-side collectives (loss denominators, metrics) use CPU tensors
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def shutdown_distributed() -> None:
    """Tear down a torchrun-launched group: barrier first, so no rank destroys gloo/NCCL
    while a peer is still in a collective (that aborts the peer at exit)."""
    if dist.is_initialized() and "RANK" in os.environ:
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # free the gloo work/tensors now, not during interpreter teardown


def build_mesh(device: torch.device, replicate: int = 1) -> DeviceMesh:
    world = dist.get_world_size()
    if world % replicate != 0:
        raise ValueError(
            f"ParallelConfig.replicate={replicate} does not divide world_size={world}; "
            f"pick a divisor of {world}"
        )
    if replicate == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def check_expert_parallel(mesh: DeviceMesh, expert_parallel: int) -> None:
    shard = mesh["shard"].size() if mesh.ndim > 1 else mesh.size()
    if expert_parallel not in (1, shard):
        raise ValueError(
            f"ParallelConfig.expert_parallel={expert_parallel} must be 1 or the shard degree "
            f"world_size / replicate = {mesh.size()} / {mesh.size() // shard} = {shard}; "
            f"set expert_parallel={shard}, or change replicate so that world_size / replicate = {expert_parallel}"
        )


def dp_group(mesh: DeviceMesh):
    """The group spanning every data-parallel rank of `mesh` (all of its dims)."""
    return mesh._flatten().get_group() if mesh.ndim > 1 else mesh.get_group()
