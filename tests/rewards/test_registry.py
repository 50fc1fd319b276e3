"""Loading rewards by name or path, and isolated concurrent scoring."""

import asyncio
import logging
import threading
import time

import pytest

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards.registry import load_function, load_reward, score_samples


def samples(k=3):
    return [Sample(prompt="q", index=i, response=str(i), label="1") for i in range(k)]


def test_builtins_and_options():
    assert load_reward("math").__name__ == "math_reward"
    boxed = load_reward("exact_match", extract="boxed")
    assert boxed(Sample(prompt="q", response="\\boxed{7}", label="7")) == 1.0
    with pytest.raises(ValueError, match=r"unknown reward 'mth'.*'math'"):
        load_reward("mth")
    with pytest.raises(ValueError, match="only apply to built-in"):
        load_reward("miles_fsdp.rewards.math:math_reward", extract="boxed")


def test_load_by_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rm.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass Cfg:\n    x: float = 0.5\n"
        "def rm(sample):\n    return Cfg().x\nNOT_FN = 3\n"
    )
    assert load_reward(f"{tmp_path / 'my_rm.py'}:rm")(None) == 0.5
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rm:rm")(None) == 0.5
    with pytest.raises(ValueError, match=r"my_rm has no attribute 'nope'"):
        load_reward("my_rm:nope")
    with pytest.raises(ValueError, match="NOT_FN is a int, not a function"):
        load_reward("my_rm:NOT_FN")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_reward("no_such_mod:rm")
    with pytest.raises(ValueError, match="file missing.py does not exist"):
        load_reward("missing.py:rm")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"importing .*broken.py failed: RuntimeError\('boom'\)"):
        load_reward(f"{tmp_path / 'broken.py'}:rm")
    with pytest.raises(ValueError, match="expected 'module.path:function'"):
        load_function("just_a_name:", "reward")


def test_sync_rewards_run_concurrently_in_threads():
    barrier = threading.Barrier(3, timeout=5)

    def rm(sample):
        barrier.wait()  # deadlocks (BrokenBarrierError -> errors) unless 3 run at once
        return float(sample.response)

    batch = samples()
    report = score_samples(batch, rm)
    assert report.rewards == [0.0, 1.0, 2.0] and report.num_errors == 0
    assert [s.reward for s in batch] == [0.0, 1.0, 2.0]


def test_async_rewards_overlap():
    async def rm(sample):
        await asyncio.sleep(0.2)
        return 1.0

    t0 = time.perf_counter()
    report = score_samples(samples(5), rm)
    assert report.rewards == [1.0] * 5
    assert time.perf_counter() - t0 < 0.8  # 5 x 0.2 s sequentially would be 1 s


def test_raising_reward_is_counted_and_logged(caplog):
    def rm(sample):
        if sample.index == 1:
            raise RuntimeError("grader exploded")
        return 1.0

    with caplog.at_level(logging.WARNING):
        report = score_samples(samples(), rm, on_error=-1.0)
    assert report.rewards == [1.0, -1.0, 1.0] and report.num_errors == 1
    assert "failed on sample 1" in caplog.text and "grader exploded" in caplog.text


def test_non_number_result_is_an_error():
    report = score_samples(samples(2), lambda s: None if s.index == 0 else float("nan"))
    assert report.num_errors == 2 and report.rewards == [0.0, 0.0]


def test_batched_rewards():
    async def rm(batch):
        return [float(len(s.response)) for s in batch]

    rm.batched = True
    assert score_samples(samples(), rm).rewards == [1.0, 1.0, 1.0]

    def short(batch):
        return [1.0]

    short.batched = True
    report = score_samples(samples(), short, on_error=0.25)
    assert report.rewards == [0.25] * 3 and report.num_errors == 3


def test_math_reward_in_reward_threads():
    # math-verify's SIGALRM timeout cannot run off the main thread; the grader must still work there
    batch = [Sample(prompt="q", response="\\boxed{\\frac{1}{2}}", label="0.5"),
             Sample(prompt="q", index=1, response="\\boxed{3}", label="2")]
    report = score_samples(batch, load_reward("math"))
    assert report.rewards == [1.0, 0.0] and report.num_errors == 0


def test_a_hanging_reward_times_out_and_is_recorded_on_the_sample(caplog):
    release = threading.Event()

    def rm(sample):
        if sample.index == 1:
            release.wait()  # never returns by itself
        return 1.0

    batch = samples()
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        report = score_samples(batch, rm, on_error=-1.0, timeout_s=0.3)
    assert time.perf_counter() - t0 < 3.0
    assert report.rewards == [1.0, -1.0, 1.0] and report.num_errors == 1 and report.num_timeouts == 1
    assert "timed out" in batch[1].reward_error and batch[0].reward_error is None
    assert "timed out" in caplog.text
    release.set()

    async def slow(sample):  # async rewards time out the same way
        await asyncio.sleep(10)

    report = score_samples(samples(2), slow, timeout_s=0.2)
    assert report.num_timeouts == 2


def test_numpy_and_tensor_scalars_are_rewards_but_bools_are_not():
    import numpy as np
    import torch

    values = [np.float32(1.5), np.int64(2), torch.tensor(0.25)]
    report = score_samples(samples(), lambda s: values[s.index])
    assert report.rewards == [1.5, 2.0, 0.25] and report.num_errors == 0
    report = score_samples(samples(2), lambda s: [True, np.bool_(False)][s.index])
    assert report.num_errors == 2


def test_repeated_failures_are_logged_once_per_kind(caplog):
    with caplog.at_level(logging.WARNING):
        report = score_samples(samples(), lambda s: float("nan"))
    assert report.num_errors == 3
    lines = [r for r in caplog.records if "failed on" in r.getMessage()]
    assert len(lines) == 1 and "3 of 3 samples" in lines[0].getMessage()


def test_a_stop_request_ends_scoring_promptly():
    from miles_fsdp.rewards.registry import RewardStopped

    hang = threading.Event()
    t0 = time.perf_counter()
    with pytest.raises(RewardStopped):
        score_samples(samples(), lambda s: hang.wait(), timeout_s=60, stop=lambda: time.perf_counter() - t0 > 0.3)
    assert time.perf_counter() - t0 < 3.0
    hang.set()
