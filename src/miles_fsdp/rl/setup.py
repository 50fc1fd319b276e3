"""The engine replica each rank holds beside its policy shard.

The trainer keeps fp32 master weights sharded by FSDP2 (train/export.load_model builds it);
the engine holds a full replica in the compute dtype (bf16 on GPU, fp32 on CPU), streamed
from the checkpoint straight onto the device, and receives exactly `param.to(dtype)` after
each step (rl/state.sync_engine): what the trainer's mixed-precision forward computes with.
With RolloutConfig.servers the rank holds an HTTP client of standalone servers instead
(rl/remote.py); they get the same weights through a checkpoint directory.
"""

from __future__ import annotations

import torch

from miles_fsdp.data.tokenizer import Tokenizer
from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.engine import Engine
from miles_fsdp.models import ModelArgs, Transformer, load_hf
from miles_fsdp.rl.remote import RemoteEngine


def load_engine_model(path: str, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """Build on meta, then stream the checkpoint in, already in `dtype` on `device`."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(path))
    return load_hf(model, path, dtype=dtype, device=device)


def build_engine(path: str, tokenizer: Tokenizer | None, cfg: EngineConfig, dtype: torch.dtype,
                 device: torch.device) -> Engine:
    model = load_engine_model(path, dtype, device).eval()
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else None
    detok = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
    return Engine(model, None, cfg, eos_token_ids=eos, detokenize=detok)


def rollout_engine(cfg, tokenizer: Tokenizer | None, dtype: torch.dtype, device: torch.device, rank: int):
    """The colocated engine of this rank, or a client of cfg.rollout.servers (RLConfig `cfg`)."""
    if cfg.rollout.servers:
        return RemoteEngine(cfg.rollout.servers, cfg.rollout.request_timeout_s, start=rank)
    return build_engine(cfg.model, tokenizer, cfg.engine, dtype, device)
