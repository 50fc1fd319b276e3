"""The rollout interface: what the RL loop and eval ask of whatever produces samples.

    generate(requests, stop=None) -> results[i][j]   sample j of request i; once stop() is True,
                                                      unfinished samples end ABORTED
    agenerate(prompt_ids, params, stop=None)         one sample, awaitable (generate hooks)
    update_weights(weights, version)                 the policy's new weights, between steps
    release() / resume()                             give memory to the trainer / take it back
    metrics() -> {name: value}                       per-step numbers for metrics.jsonl
    close()

Implementations: `Engine` (in-process, engine/engine.py), `RemoteEngine` (HTTP client of
`miles-fsdp serve` instances, engine/remote.py) and `ReplaySource` (samples saved by a
rollout-only run, engine/replay.py). The loop never asks which one it holds.

`weights` is a WeightSource: the trainer's weights in the engine's dtype, either streamed in
buckets of full tensors (the in-process engine copies one bucket at a time) or written as an
HF checkpoint directory (servers load it from a shared filesystem). Both are collective:
every rank calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from miles_fsdp.engine.sequence import Request, Result, SamplingParams


class WeightSource(Protocol):
    def buckets(self) -> Iterator[dict[str, torch.Tensor]]:
        """{parameter name: full tensor} buckets, one alive at a time. Collective."""

    def save_hf(self, path: str | Path) -> Path:
        """Write the weights as an HF checkpoint directory (rank 0 writes). Collective."""


class RolloutSource(Protocol):
    def generate(self, requests: list[Request], stop: Callable[[], bool] | None = None) -> list[list[Result]]: ...

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams,
                        stop: Callable[[], bool] | None = None) -> Result: ...

    def update_weights(self, weights: WeightSource, version: int) -> None: ...

    def release(self) -> None: ...

    def resume(self) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...
