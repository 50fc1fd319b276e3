"""Expert parallelism: each rank of the EP group holds E / ep experts of every MoE layer.

    rank r, its tokens x_TD --route (MoE.forward, unchanged)--> x_RD sorted by global expert id
      |  rows of experts [s*El, (s+1)*El) are contiguous: block s goes to rank s
      |  all_to_all #1: row counts per (destination rank, local expert)      counts_SE
      |  all_to_all #2: the rows                                             x_recv (source-major)
      v
    regroup expert-major (stable: source order kept inside an expert) -> swiglu_experts with
    the local weight slices [El, F, D] / [El, D, F] -> undo the regroup
      |  all_to_all #3: result rows return to their token's rank (the inverse of #2)
      v
    y_RD in the original sorted order -> MoE.forward unsorts and combines in fixed j order (fp32)

Invariance: a routed row's result depends only on the row and its expert's weights (the
kernels are row-independent), and the combine never leaves the token's rank, so outputs
are bitwise those of the non-EP model. Collectives go through
`torch.distributed.nn.functional.all_to_all_single` (autograd-aware: the backward is the
reverse all_to_all), which gloo (CPU) and NCCL both implement.

Placement: the expert weights become DTensors `Shard(0)` over the EP dim of the trainer's
mesh (`[Replicate(), Shard(0)]` on an HSDP mesh), so DCP checkpoints, `full_tensor()`
weight sync / HF export and grad-norm clipping see the global [E, ...] tensor. FSDP
ignores them (`apply_fsdp(..., ignored_params=expert_params(model))`): with EP the expert
params are sharded by EP only, not further by FSDP.

Gradients: the trainer scales the loss by dp_size and relies on FSDP to average gradients
over the dp ranks. The expert shard on rank r already sums the contributions of every
token routed to it from the whole EP group (all_to_all backward), so a grad hook divides
by dp_size, and on an HSDP mesh first sums over the replicate dim (the other copies of the
same experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from miles_fsdp.models.moe import MoE, swiglu_experts

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


class ExpertParallel:
    """`MoE.expert_fn` for experts sharded over `group` (rank i holds experts [i*El, (i+1)*El))."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, moe: MoE, x_RD: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
        ep = dist.get_world_size(self.group)
        E, D = group_sizes_E.numel(), x_RD.shape[1]
        El = E // ep
        # counts_SE[s, e]: rows this rank sends to rank s for its local expert e
        send_counts_SE = group_sizes_E.view(ep, El).contiguous()
        recv_counts_SE = torch.empty_like(send_counts_SE)
        dist.all_to_all_single(recv_counts_SE, send_counts_SE, group=self.group)
        send_splits = send_counts_SE.sum(1).tolist()  # host sync: split sizes are host ints
        recv_splits = recv_counts_SE.sum(1).tolist()

        x_recv = dist_fn.all_to_all_single(x_RD.new_empty(sum(recv_splits), D), x_RD.contiguous(),
                                           recv_splits, send_splits, group=self.group)
        # received rows are source-major; the local expert of each, then a stable regroup
        local_id = torch.arange(El, device=x_RD.device).repeat(ep)
        expert_of_row = torch.repeat_interleave(local_id, recv_counts_SE.reshape(-1).to(x_RD.device))
        regroup = torch.argsort(expert_of_row, stable=True)
        local_sizes_E = recv_counts_SE.sum(0)

        w_gate, w_up, w_down = (_local(getattr(moe, n), x_RD.dtype) for n in EXPERT_PARAMS)
        y_loc = swiglu_experts(x_recv[regroup], w_gate, w_up, w_down, local_sizes_E)
        ungroup = torch.empty_like(regroup)
        ungroup[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        y_recv = y_loc[ungroup]
        return dist_fn.all_to_all_single(x_RD.new_empty(x_RD.shape[0], y_recv.shape[1]), y_recv.contiguous(),
                                         send_splits, recv_splits, group=self.group)


def _local(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The same cast FSDP's MixedPrecisionPolicy applies to the non-EP params (fp32 -> bf16
    # on GPU, a no-op in fp32), so expert matmuls see identical weight values.
    w = w.to_local() if isinstance(w, DTensor) else w
    return w.to(dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    """The stacked expert weights of every MoE layer (what FSDP must leave to EP)."""
    return {getattr(m, n) for m in moe_layers(model) for n in EXPERT_PARAMS}


def apply_ep(model: nn.Module, mesh: DeviceMesh, ep_dim: str = "shard", dp_size: int | None = None) -> nn.Module:
    """Shard every MoE layer's experts over `mesh[ep_dim]` and route tokens by all_to_all.

    `mesh` is the trainer's mesh (1-D ("shard",) or HSDP ("replicate", "shard")); experts are
    `Shard(0)` over `ep_dim` and replicated over the other dim. `dp_size` (default: the mesh
    size) is the factor the trainer's loss scaling expects gradients to be averaged by.
    Call before activation checkpointing and FSDP; the model must hold full fp32 weights.
    """
    ep_mesh = mesh[ep_dim] if mesh.ndim > 1 else mesh
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    dp_size = dp_size or mesh.size()
    placements = [Replicate() if name != ep_dim else Shard(0) for name in mesh.mesh_dim_names]
    replicate_groups = [mesh.get_group(name) for name in mesh.mesh_dim_names if name != ep_dim]
    fn = ExpertParallel(ep_mesh.get_group())
    if not moe_layers(model):
        raise ValueError(f"ParallelConfig.expert_parallel={ep}: the model has no MoE layers; set expert_parallel=1")
    for moe in moe_layers(model):
        if moe.n_experts % ep != 0:
            raise ValueError(
                f"ParallelConfig.expert_parallel={ep} does not divide num_experts={moe.n_experts}; "
                f"pick a divisor of {moe.n_experts}"
            )
        El = moe.n_experts // ep
        for name in EXPERT_PARAMS:
            p = getattr(moe, name)
            if isinstance(p, DTensor) or p.is_meta:
                raise ValueError(
                    f"apply_ep: {name} is already distributed or on meta; apply EP to full weights, before FSDP"
                )
            local = p.detach()[ep_rank * El: (ep_rank + 1) * El].clone()
            dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
            new = nn.Parameter(dt, requires_grad=p.requires_grad)
            if new.requires_grad:
                new.register_hook(_grad_hook(replicate_groups, dp_size))
            setattr(moe, name, new)
        moe.expert_fn = fn
    return model


def _grad_hook(replicate_groups: list[dist.ProcessGroup], dp_size: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        local = g.to_local() if isinstance(g, DTensor) else g
        local = local / dp_size  # out of place: autograd may still hold g
        for group in replicate_groups:
            dist.all_reduce(local, group=group)
        if isinstance(g, DTensor):
            return DTensor.from_local(local, g.device_mesh, g.placements, run_check=False, shape=g.shape,
                                      stride=g.stride())
        return local

    return hook
