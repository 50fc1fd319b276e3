"""Contract for a custom generate function (multi-turn, tool use), named as `module:function`.

    async def generate(sample: Sample, engine_call: EngineCall, sampling_params) -> Sample

- `engine_call(prompt_ids, sampling_params)` is awaited and returns a `TurnOutput`: the
  new token ids and their logprobs. The hook may call it many times (one per model turn),
  passing edited params (e.g. a smaller max_new_tokens); `sampling_params` is the
  engine's `SamplingParams`, passed through untouched by the loop.
- The returned Sample's `response_ids` concatenate every token after the prompt, model and
  non-model (tool output, environment observations) alike, with `loss_mask` 1 / 0 and
  `response_logprobs` the model's logprob / 0.0 respectively. Use `append_model_turn` and
  `append_env_tokens` to keep the three lists aligned.
- The hook sets `status` (COMPLETED, TRUNCATED, ...) and `response` text; the loop checks
  the result with `check_generated` and scores it with the reward afterwards.

    prompt_ids | model turn 1 | tool output | model turn 2
    loss_mask:   1 1 1 1        0 0 0         1 1 1
"""

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards.registry import is_async, load_function


@dataclass(slots=True)
class TurnOutput:
    token_ids: list[int]
    """Tokens the model generated in this call."""
    logprobs: list[float]
    """Their logprobs under the sampling distribution, one per token."""
    finish_reason: str = "stop"
    """"stop" (EOS / stop token or string) or "length" (hit max_new_tokens)."""


EngineCall = Callable[[list[int], Any], Awaitable[TurnOutput]]
GenerateFn = Callable[[Sample, EngineCall, Any], Awaitable[Sample]]


def append_model_turn(sample: Sample, out: TurnOutput) -> None:
    """Append model tokens: trained on (mask 1), with their sampling logprobs."""
    if len(out.logprobs) != len(out.token_ids):
        raise ValueError(f"engine returned {len(out.token_ids)} tokens but {len(out.logprobs)} logprobs")
    sample.response_ids.extend(out.token_ids)
    sample.response_logprobs.extend(out.logprobs)
    sample.loss_mask.extend([1] * len(out.token_ids))


def append_env_tokens(sample: Sample, token_ids: list[int]) -> None:
    """Append tool/environment tokens: in the context, not trained on (mask 0, logprob 0)."""
    sample.response_ids.extend(token_ids)
    sample.response_logprobs.extend([0.0] * len(token_ids))
    sample.loss_mask.extend([0] * len(token_ids))


def check_generated(sample: Sample, hook_name: str = "generate") -> Sample:
    """Raise with the hook's name if the returned sample breaks the contract."""
    if not isinstance(sample, Sample):
        raise TypeError(f"{hook_name} returned {type(sample).__name__}; it must return the Sample it was given")
    sample.check()
    bad = [i for i, (m, lp) in enumerate(zip(sample.loss_mask, sample.response_logprobs)) if m == 0 and lp != 0.0]
    if bad:
        raise ValueError(f"{hook_name}: response tokens {bad[:5]} have loss_mask 0 but nonzero logprobs; "
                         "non-model tokens must carry logprob 0.0 (use append_env_tokens)")
    if any(m not in (0, 1) for m in sample.loss_mask):
        raise ValueError(f"{hook_name}: loss_mask must hold only 0 and 1")
    return sample


def load_generate(spec: str) -> GenerateFn:
    """Load a custom generate function by `module:function` or `file.py:function`, checking its shape."""
    fn = load_function(spec, "generate function")
    if not is_async(fn):
        raise ValueError(f"generate function {spec!r} must be `async def generate(sample, engine_call, sampling_params)`")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise ValueError(
            f"generate function {spec!r} has signature {inspect.signature(fn)}; "
            "expected (sample, engine_call, sampling_params)"
        ) from None
    return fn
