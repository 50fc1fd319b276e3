"""Offline generation through the engine: what `miles-fsdp generate` calls.

One Result per prompt, prompt i sampled with seed + i (so a prompt's output does not depend
on the others), all prompts in one engine run.
"""

from __future__ import annotations

import dataclasses

from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.engine import Engine
from miles_fsdp.engine.sequence import Request, Result, SamplingParams


def generate_from_prompts(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> list[Result]:
    """Sample one completion per prompt (token ids) with the engine; each stops at `stop_ids`
    or after max_new_tokens. The KV cache gets exactly the pages all prompts need at once on
    CPU, and EngineConfig.kv_memory_fraction of the free memory on CUDA."""
    config = EngineConfig()
    if next(model.parameters()).device.type != "cuda":
        S = config.page_size
        need = sum(-(-(len(p) + max_new_tokens) // S) for p in prompts) + 1
        config = dataclasses.replace(config, num_pages=max(need, 2))
    engine = Engine(model, config=config, eos_token_ids=[])
    requests = [
        Request(p, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                  stop_token_ids=tuple(stop_ids), seed=(seed + i) % 2**32), request_id=f"prompt-{i}")
        for i, p in enumerate(prompts)
    ]
    return [samples[0] for samples in engine.generate(requests)]
