"""Custom generate contract: a two-turn tool-using hook against a fake engine and environment."""

import asyncio

import pytest

from miles_fsdp.data.sample import Sample, Status
from miles_fsdp.rl.generate_hook import (
    TurnOutput, append_env_tokens, append_model_turn, check_generated, load_generate,
)

HOOK = '''
from miles_fsdp.data.sample import Status
from miles_fsdp.rl.generate_hook import append_env_tokens, append_model_turn

TOOL_TOKENS = [900, 901]


async def generate(sample, engine_call, sampling_params):
    context = list(sample.prompt_ids)
    for turn in range(2):
        out = await engine_call(context + sample.response_ids, sampling_params)
        append_model_turn(sample, out)
        if turn == 0:
            append_env_tokens(sample, TOOL_TOKENS)  # the tool's reply, not trained on
    sample.status = Status.COMPLETED if out.finish_reason == "stop" else Status.TRUNCATED
    return sample


def not_async(sample, engine_call, sampling_params):
    return sample


async def wrong_arity(sample):
    return sample
'''


@pytest.fixture
def hook_file(tmp_path):
    path = tmp_path / "tool_hook.py"
    path.write_text(HOOK)
    return path


def test_two_turn_tool_rollout(hook_file):
    calls = []

    async def engine_call(prompt_ids, params):
        calls.append(list(prompt_ids))
        k = len(calls)
        return TurnOutput([10 * k, 10 * k + 1], [-0.1 * k, -0.2 * k], "stop" if k == 2 else "length")

    generate = load_generate(f"{hook_file}:generate")
    sample = Sample(prompt="use the tool", prompt_ids=[1, 2])
    out = check_generated(asyncio.run(generate(sample, engine_call, {"max_new_tokens": 2})))
    # second call sees prompt + turn 1 + tool output
    assert calls == [[1, 2], [1, 2, 10, 11, 900, 901]]
    assert out.response_ids == [10, 11, 900, 901, 20, 21]
    assert out.loss_mask == [1, 1, 0, 0, 1, 1]
    assert out.response_logprobs == pytest.approx([-0.1, -0.2, 0.0, 0.0, -0.2, -0.4])
    assert out.status is Status.COMPLETED


def test_loader_rejects_bad_hooks(hook_file):
    with pytest.raises(ValueError, match="must be `async def generate"):
        load_generate(f"{hook_file}:not_async")
    with pytest.raises(ValueError, match=r"expected \(sample, engine_call, sampling_params\)"):
        load_generate(f"{hook_file}:wrong_arity")
    with pytest.raises(ValueError, match="generate function 'nomodule_xyz:gen': cannot import"):
        load_generate("nomodule_xyz:gen")


def test_check_generated_catches_contract_breaks():
    s = Sample(prompt="p")
    append_model_turn(s, TurnOutput([1], [-0.5]))
    append_env_tokens(s, [2])
    check_generated(s)
    s.response_logprobs[1] = -0.3
    with pytest.raises(ValueError, match=r"tokens \[1\] have loss_mask 0 but nonzero logprobs"):
        check_generated(s)
    s.loss_mask.append(1)
    with pytest.raises(ValueError, match="one entry per response token"):
        check_generated(s)
    with pytest.raises(TypeError, match="must return the Sample"):
        check_generated({"response_ids": []}, "my_hook")
    with pytest.raises(ValueError, match="2 tokens but 1 logprobs"):
        append_model_turn(Sample(prompt="p"), TurnOutput([1, 2], [-0.1]))
