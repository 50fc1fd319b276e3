"""Reward loading and isolated, concurrent scoring.

A reward is any of
    def reward(sample: Sample) -> float                       (runs in a thread pool)
    async def reward(sample: Sample) -> float
    def/async def reward(samples: list[Sample]) -> list[float], with `reward.batched = True`
named by a built-in name ("math", "exact_match") or by `module:function` /
`path/to/file.py:function`. `score_samples` never lets a reward crash the run: an
exception (or a non-number result) is logged with the sample, scored `on_error`, counted.
"""

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards.exact_match import make_exact_match
from miles_fsdp.rewards.math import math_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "math": lambda: math_reward,
    "exact_match": make_exact_match,
}


def load_function(spec: str, what: str) -> Callable[..., Any]:
    """Import `module.path:function` or `path/to/file.py:function`; `what` names the hook in errors."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise ValueError(f"{what} {spec!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: file {module_part} does not exist")
        mod_name = f"_miles_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up here
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ValueError(f"{what} {spec!r}: importing {module_part} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import module {module_part!r} ({e})") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{what} {spec!r}: {module_part} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def load_reward(spec: str, **options: Any) -> RewardFn:
    """A built-in reward by name (options go to its factory, e.g. extract="boxed") or a user one."""
    if spec in BUILTINS:
        return BUILTINS[spec](**options)
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTINS)} or 'module:function'")
    if options:
        raise ValueError(f"reward {spec!r}: options {sorted(options)} only apply to built-in rewards")
    return load_function(spec, "reward")


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


@dataclass(slots=True)
class ScoreReport:
    rewards: list[float]
    num_errors: int
    """Samples scored `on_error` because the reward raised or returned a non-number."""


def _as_reward(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"reward returned {value!r}; expected a finite float")
    return float(value)


async def ascore_samples(
    samples: list[Sample], fn: RewardFn, on_error: float = 0.0, max_workers: int = 8
) -> ScoreReport:
    """Score concurrently (asyncio; sync rewards in a thread pool); sets `sample.reward` too."""
    loop = asyncio.get_running_loop()
    fn_name = getattr(fn, "__name__", repr(fn))
    errors = 0

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward") as pool:

        async def call(arg):
            if is_async(fn):
                return await fn(arg)
            return await loop.run_in_executor(pool, fn, arg)

        def failed(sample: Sample, e: BaseException) -> float:
            nonlocal errors
            errors += 1
            logger.warning(
                "reward %s failed on sample %d (group %d, label %r, response %r): %r; scored %s",
                fn_name, sample.index, sample.group_index, sample.label, sample.response[:200], e, on_error,
            )
            return on_error

        if getattr(fn, "batched", False):
            try:
                values = await call(samples)
                if not isinstance(values, list | tuple) or len(values) != len(samples):
                    raise TypeError(f"batched reward returned {type(values).__name__} of wrong length for "
                                    f"{len(samples)} samples; expected a list with one float per sample")
                rewards = []
                for s, v in zip(samples, values):
                    try:
                        rewards.append(_as_reward(v))
                    except TypeError as e:
                        rewards.append(failed(s, e))
            except Exception as e:
                rewards = [failed(s, e) for s in samples]
        else:

            async def one(sample: Sample) -> float:
                try:
                    return _as_reward(await call(sample))
                except Exception as e:
                    return failed(sample, e)

            rewards = list(await asyncio.gather(*(one(s) for s in samples)))

    for s, r in zip(samples, rewards):
        s.reward = r
    return ScoreReport(rewards, errors)


def score_samples(
    samples: list[Sample], fn: RewardFn, on_error: float = 0.0, max_workers: int = 8
) -> ScoreReport:
    """Synchronous entry point of `ascore_samples` (must not be called inside a running event loop)."""
    return asyncio.run(ascore_samples(samples, fn, on_error, max_workers))
