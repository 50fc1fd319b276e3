"""FSDP2 sharding of a Transformer (torchtitan `apply_fsdp` style; the model file has no
distributed code).

- One `fully_shard` unit per transformer block, then the root (embedding, final norm,
  lm_head): each block's parameters are all-gathered just before it runs and freed after,
  so peak parameter memory is one block plus the root. `per_block=False` makes the whole
  model one unit (ParallelConfig.fsdp_units "model"; the default where nothing is sharded
  on several ranks, one rank per replica: the per-block all-gather copies, casts and hooks
  then buy nothing). One rank alone runs without FSDP by default (parallel/local.py).
- The last block is not resharded after forward: backward starts with it, so freeing and
  re-gathering it would be wasted communication.
- Each MTP draft module (`model.mtp`, models/mtp.py) is its own unit too, wrapped after the
  blocks and before the root, so the trunk's units are the same with or without a draft.
  Its `forward_normed` (training: g and norm(g) in one gather) is a registered forward method.
- Mixed precision: `param_dtype` compute, fp32 gradient reduction, fp32 master weights in
  the optimizer. `cast_forward_inputs=False`: inputs are token ids and attention metadata,
  nothing to cast, and the model's own dtype flow stays as written.
- `ignored_params`: parameters FSDP leaves alone (the expert weights under expert
  parallelism, which are DTensors sharded by EP and synchronised by parallel/ep.py).
- `Transformer.logits`, `token_logprobs` and the draft's `draft_forward`, `draft_logits`,
  `draft_token_logprobs` are registered as forward methods, so calling them outside `forward`
  still all-gathers the root's embedding and lm_head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    raise TypeError(f"{type(model).__name__} has no `layers` ModuleList/ModuleDict of transformer blocks")


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    ignored_params: set[nn.Parameter] | None = None,
    per_block: bool = True,
) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kw = dict(mesh=mesh, mp_policy=mp, ignored_params=ignored_params or None)
    if cpu_offload:
        # pin_memory needs CUDA; on a CPU-only host pinned buffers are unavailable.
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = blocks_of(model)
    if per_block:
        for i, block in enumerate(blocks):
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
        for draft_module in getattr(model, "mtp", ()):
            fully_shard(draft_module, **kw)
            register_fsdp_forward_method(draft_module, "forward_normed")
    # the whole model as one unit: say outright that it stays gathered from forward into
    # backward (the root's default is only a heuristic of the torch version at hand)
    fully_shard(model, **kw, **({} if per_block else {"reshard_after_forward": False}))
    for method in ("logits", "token_logprobs", "draft_forward", "draft_logits", "draft_token_logprobs"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def drop_unsynced_grads(model: nn.Module) -> None:
    """Forget the grads FSDP keeps between backwards without gradient sync (deferred sync: the
    unsharded sums), so a failed step's partial sums never reach the next step's reduce. This
    is FSDP2's private state: its attributes are looked up, never assumed."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()):
            if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
                fsdp_param.unsharded_accumulated_grad = None
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
