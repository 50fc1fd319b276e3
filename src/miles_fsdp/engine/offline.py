"""Offline generation through the engine: what `miles-fsdp generate` calls.

Drop-in for the command's reference loop: same arguments, prompt i sampled with seed + i
(so a prompt's output does not depend on the others), one Result per prompt.
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
    config: EngineConfig | None = None,
    tokenizer=None,
) -> list[Result]:
    """Sample one completion per prompt (token ids) with the engine.

    Without `config`, the KV cache gets exactly the pages all prompts need at once on CPU
    (and kv_memory_fraction of free memory on CUDA). Stops at `stop_ids` (plus the
    tokenizer's eos when a tokenizer is given) or after max_new_tokens.
    """
    config = config or EngineConfig()
    device = next(model.parameters()).device
    if device.type != "cuda" and not (config.num_pages or config.kv_memory_bytes):
        S = config.page_size
        need = sum(-(-(len(p) + max_new_tokens) // S) for p in prompts) + 1
        config = dataclasses.replace(config, num_pages=max(need, 2))
    engine = Engine(model, tokenizer=tokenizer, config=config, eos_token_ids=None if tokenizer else [])
    requests = [
        Request(p, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                  stop_token_ids=tuple(stop_ids), seed=(seed + i) % 2**32), request_id=f"prompt-{i}")
        for i, p in enumerate(prompts)
    ]
    return [samples[0] for samples in engine.generate(requests)]
