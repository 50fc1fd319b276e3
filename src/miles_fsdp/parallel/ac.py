"""Activation checkpointing, one wrapper per transformer block (applied before FSDP).

`checkpoint_wrapper` keeps state_dict names unchanged (it strips its own prefix), so
checkpoints and weight sync see the plain module names.

Blocks write K/V in place into the scratch paged cache they are handed. Recomputing a
block would write into that cache a second time and trip autograd's version check, so the
checkpointed function works on copies of its non-differentiable float inputs (the caches,
cos/sin): forward and recompute then both start from the same pristine values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint


def _fresh(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
        return t.clone()
    return t


def _checkpoint_fresh_inputs(fn, *args, **kwargs):
    def run(*a, **kw):
        return fn(*[_fresh(t) for t in a], **{k: _fresh(v) for k, v in kw.items()})

    # preserve_rng_state=False: blocks have no dropout; saving RNG state costs a sync.
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def apply_ac(model: nn.Module) -> nn.Module:
    layers = model.layers
    keys = list(layers.keys()) if isinstance(layers, nn.ModuleDict) else range(len(layers))
    for k in keys:
        layers[k] = checkpoint_wrapper(layers[k], checkpoint_fn=_checkpoint_fresh_inputs)
    return model
