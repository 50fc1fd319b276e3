"""Build what an RL run holds on each rank: the policy trainer, the engine replica, the reference.

The trainer keeps fp32 master weights sharded by FSDP2; the engine holds a full replica in
the compute dtype (bf16 on GPU, fp32 on CPU), receiving exactly `param.to(dtype)` after each
step, which is what the trainer's mixed-precision forward computes with.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miles_fsdp.data.tokenizer import Tokenizer
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.engine import Engine
from miles_fsdp.models import ModelArgs, Transformer, load_hf


def compute_dtype(device: torch.device, trainer_cfg) -> torch.dtype:
    return trainer_cfg.parallel.compute_dtype(device)


def load_model(path: str, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """Build on meta, then stream the checkpoint in (never materialised twice)."""
    args = ModelArgs.from_hf(path)
    with torch.device("meta"):
        model = Transformer(args)
    return load_hf(model, path, dtype=dtype, device=device)


def build_engine(path_or_model, tokenizer: Tokenizer | None, cfg: EngineConfig, dtype: torch.dtype,
                 device: torch.device) -> Engine:
    model = load_model(path_or_model, dtype, device) if isinstance(path_or_model, str) else path_or_model
    model.eval()
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else None
    detok = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
    return Engine(model, None, cfg, eos_token_ids=eos, detokenize=detok)


def _plain_name(name: str) -> str:
    # activation checkpointing wraps blocks; the engine's replica has the plain names
    return name.replace("_checkpoint_wrapped_module.", "")


@torch.no_grad()
def full_weights(model: nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters cast to `dtype`, gathered from FSDP shards if sharded.

    Every rank must call it (the all-gathers are collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[_plain_name(name)] = t.to(device=device, dtype=dtype)
    return out
