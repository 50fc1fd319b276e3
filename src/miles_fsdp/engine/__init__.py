"""In-process rollout engine: paged KV cache, prefix cache, continuous batching, CUDA graphs."""

from miles_fsdp.engine.config import EngineConfig
from miles_fsdp.engine.engine import Engine
from miles_fsdp.engine.sequence import FinishReason, Request, Result, SamplingParams, StepOutput, Timings

__all__ = ["Engine", "EngineConfig", "FinishReason", "Request", "Result", "SamplingParams", "StepOutput", "Timings"]
