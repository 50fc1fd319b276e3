"""Plugin contracts: the signatures users write against. Changing one breaks user code."""

import inspect

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards import registry
from miles_fsdp.rewards.exact_match import exact_match_reward
from miles_fsdp.rewards.math import math_reward
from miles_fsdp.rl import generate_hook


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_builtin_rewards_take_one_sample():
    for fn in (math_reward, exact_match_reward):
        assert params(fn) == ["sample"]
        assert isinstance(fn(Sample(prompt="q", response="\\boxed{1}", label="1")), float)


def test_registry_signatures():
    assert params(registry.load_reward) == ["spec", "options"]
    assert params(registry.score_samples) == ["samples", "fn", "on_error", "max_workers", "timeout_s", "stop"]
    assert inspect.signature(registry.score_samples).parameters["on_error"].default == 0.0
    assert set(registry.BUILTINS) == {"math", "exact_match"}


def test_generate_hook_contract():
    assert params(generate_hook.load_generate) == ["spec"]
    assert [f for f in generate_hook.TurnOutput.__slots__] == ["token_ids", "logprobs", "finish_reason"]
    assert params(generate_hook.append_model_turn) == ["sample", "out"]
    assert params(generate_hook.append_env_tokens) == ["sample", "token_ids"]


def test_sample_fields_are_stable():
    assert [f for f in Sample.__slots__] == [
        "prompt", "group_index", "index", "label", "prompt_ids", "response", "response_ids",
        "response_logprobs", "loss_mask", "reward", "status", "seed", "reward_error", "weight_version", "metadata",
    ]
