"""Full-weight gathering for the rollout engine.

The engine receives exactly `param.to(dtype)` (bf16 by default): under FSDP each sharded fp32
master is cast on its shard (elementwise, so identical to casting the full tensor) and then
all-gathered, which moves half the bytes of gathering fp32. Tensors come in buckets of about
`bucket_bytes`, with the model's state-dict names; a consumer that drops each bucket before
asking for the next (Engine.update_weights does) holds at most one bucket of extra memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from miles_fsdp.train.export import export_hf


def iter_weight_buckets(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, bucket_bytes: int = 512 * 2**20
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {name: full tensor} buckets. Collective: every rank must run it to the end
    (each tensor's all-gather happens as the iterator reaches it)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        bucket[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
        size += bucket[name].numel() * bucket[name].element_size()
        del t
        if size >= bucket_bytes:
            yield bucket
            bucket, size = {}, 0  # the consumer dropped its reference: the bucket is freed here
    if bucket:
        yield bucket


class PolicyWeights:
    """The trainer's weights as the rollout interface's WeightSource (engine/source.py):
    exactly `param.to(dtype)`, gathered from the FSDP shards. Both methods are collective."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, bucket_bytes: int = 512 * 2**20):
        self.model, self.dtype, self.bucket_bytes = model, dtype, bucket_bytes

    def buckets(self) -> Iterator[dict[str, torch.Tensor]]:
        with torch.no_grad():
            yield from iter_weight_buckets(self.model, self.dtype, self.bucket_bytes)

    def save_hf(self, path: str | Path) -> Path:
        export_hf(self.model, path, dtype=self.dtype)
        return Path(path)


def sync_weights(
    model: nn.Module,
    update_fn: Callable[[dict[str, torch.Tensor]], None],
    dtype: torch.dtype = torch.bfloat16,
    bucket_bytes: int = 512 * 2**20,
) -> dict[str, float]:
    """Push every bucket through `update_fn` (e.g. the engine's update_weights) and time it."""
    t0 = time.perf_counter()
    n_bytes = n_buckets = 0
    with torch.no_grad():
        for bucket in iter_weight_buckets(model, dtype, bucket_bytes):
            update_fn(bucket)
            n_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
            n_buckets += 1
    return {"time/weight_sync_s": time.perf_counter() - t0, "weight_sync/gib": n_bytes / 2**30,
            "weight_sync/buckets": float(n_buckets)}
