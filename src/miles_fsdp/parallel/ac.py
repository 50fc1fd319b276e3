"""Activation checkpointing, one wrapper per transformer block (applied before FSDP).

`checkpoint_wrapper` keeps state_dict names unchanged (it strips its own prefix), so
checkpoints and weight sync see the plain module names.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(model: nn.Module) -> nn.Module:
    layers = model.layers
    keys = list(layers.keys()) if isinstance(layers, nn.ModuleDict) else range(len(layers))
    for k in keys:
        # preserve_rng_state=False: blocks have no dropout; saving RNG state costs a sync.
        wrapped = checkpoint_wrapper(layers[k], preserve_rng_state=False)
        layers[k] = wrapped
    return model
