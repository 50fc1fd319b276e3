"""Speculation on vs off on one workload: the speedup, the draft's acceptance, and a check
that the outputs are the same (tokens, log-probs, finish reasons), as they must be.

    make_engine(k)   an engine speculating k tokens per step (0 = off), same model and settings
    requests         the workload: each run gets fresh copies

Each setting runs `repeats` times after one untimed warm-up pass (allocations, CUDA graph
capture, kernel compilation); the fastest pass counts. Every pass starts from an empty
prefix cache, as the first did. Used by the quickstart and
tools/bench/spec.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from miles_fsdp.engine.engine import Engine
from miles_fsdp.engine.sequence import Request


def compare_speculation(make_engine: Callable[[int], Engine], requests: list[Request], k: int,
                        repeats: int = 1) -> dict:
    """{tokens, seconds_off, seconds_on, tokens_per_s_off/on, speedup, mean_accept_length,
    accept_rate, accept_rate_by_position, outputs_identical}; k >= 1."""
    if k < 1:
        raise ValueError(f"compare_speculation: k={k}; speculation on needs k >= 1 draft tokens")
    off, off_s, _ = timed_outputs(make_engine(0), requests, repeats)
    on, on_s, spec = timed_outputs(make_engine(k), requests, repeats)
    tokens = sum(len(r[0]) for rs in off for r in rs)
    rates = [spec[f"engine/spec_accept_rate_{i + 1}"] for i in range(k) if f"engine/spec_accept_rate_{i + 1}" in spec]
    return {"k": k, "tokens": tokens, "seconds_off": off_s, "seconds_on": on_s,
            "tokens_per_s_off": tokens / off_s, "tokens_per_s_on": tokens / on_s, "speedup": off_s / on_s,
            "mean_accept_length": spec.get("engine/spec_mean_accept_len", 1.0),
            "accept_rate": spec.get("engine/spec_accept_rate", 0.0), "accept_rate_by_position": rates,
            "outputs_identical": on == off}


def timed_outputs(engine: Engine, requests: list[Request], repeats: int) -> tuple[list, float, dict]:
    """(outputs, fastest pass in seconds, the engine's spec metrics over the timed passes)."""
    cuda = next(engine.model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = _outputs(engine, requests)  # warm-up
    engine.metrics()  # drop the warm-up's acceptance counts
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        got = _outputs(engine, requests)
        sync()
        best = min(best, time.perf_counter() - t0)
        if got != out:
            raise RuntimeError("compare_speculation: the same requests gave different outputs on a rerun; the engine "
                               "is not deterministic here (a bug: please report it)")
    return out, best, engine.metrics()


def _outputs(engine: Engine, requests: list[Request]) -> list:
    engine.blocks.invalidate_cache()
    results = engine.generate([Request(list(r.prompt_ids), r.params) for r in requests])
    return [[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in sorted(rs, key=lambda s: s.sample_index)]
            for rs in results]
