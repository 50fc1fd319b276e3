"""Reward loading and isolated, concurrent scoring.

A reward is any of
    def reward(sample: Sample) -> float                       (runs in a thread pool)
    async def reward(sample: Sample) -> float
    def/async def reward(samples: list[Sample]) -> list[float], with `reward.batched = True`
named by a built-in name ("math", "exact_match") or by `module:function` /
`path/to/file.py:function`. `score_samples` never lets a reward crash or hang the run: an
exception, a non-number result or a call past the timeout is scored `on_error`, counted,
recorded on the sample (`Sample.reward_error`) and logged once per kind of failure.
"""

import asyncio
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles_fsdp.data.sample import Sample
from miles_fsdp.errors import UserError
from miles_fsdp.rewards.exact_match import make_exact_match
from miles_fsdp.rewards.math import math_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "math": lambda: math_reward,
    "exact_match": make_exact_match,
}


class LoadError(UserError, ValueError):
    """A reward or hook named by path that cannot be loaded; the message says why."""


def load_function(spec: str, what: str) -> Callable[..., Any]:
    """Import `module.path:function` or `path/to/file.py:function`; `what` names the hook in errors."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise LoadError(f"{what} {spec!r}: expected 'module.path:function' or 'path/to/file.py:function'")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise LoadError(f"{what} {spec!r}: file {module_part} does not exist")
        mod_name = f"_miles_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up here
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise LoadError(f"{what} {spec!r}: importing {module_part} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise LoadError(f"{what} {spec!r}: cannot import module {module_part!r} ({e})") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise LoadError(f"{what} {spec!r}: {module_part} has no attribute {name!r}")
    if not callable(fn):
        raise LoadError(f"{what} {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def load_reward(spec: str, **options: Any) -> RewardFn:
    """A built-in reward by name (options go to its factory, e.g. extract="boxed") or a user one."""
    if spec in BUILTINS:
        return BUILTINS[spec](**options)
    if ":" not in spec:
        raise LoadError(f"unknown reward {spec!r}: use one of {sorted(BUILTINS)} or 'module:function'")
    if options:
        raise LoadError(f"reward {spec!r}: options {sorted(options)} only apply to built-in rewards")
    return load_function(spec, "reward")


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class RewardStopped(Exception):
    """Scoring was cut short because a stop (SIGTERM/SIGINT) was requested."""


@dataclass(slots=True)
class ScoreReport:
    rewards: list[float]
    num_errors: int
    """Samples scored `on_error` because the reward raised, returned a non-number or timed out."""
    num_timeouts: int = 0
    """Of those, samples whose reward did not return within the timeout."""


def _as_reward(value: Any) -> float:
    """A finite real number: Python or numpy scalars, 0-d numpy arrays / tensors; not bool."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise TypeError(f"reward returned {value!r} ({type(value).__name__}); expected a finite number")
    if not math.isfinite(value):
        raise TypeError(f"reward returned {value!r}; expected a finite number")
    return float(value)


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], arg: Any) -> asyncio.Future:
    """fn(arg) in a daemon thread: a reward that never returns is abandoned at its timeout and
    cannot keep the process alive (a ThreadPoolExecutor would join it at exit)."""
    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run() -> None:
        try:
            outcome = (True, fn(arg))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop has closed: this call timed out and was abandoned
            pass

    threading.Thread(target=run, name="reward", daemon=True).start()
    return fut


def _log_failures(fn_name: str, failures: list[tuple[Sample, str]], total: int, on_error: float) -> None:
    """One warning per distinct error (not one per sample), naming the first sample it hit."""
    by_error: dict[str, list[Sample]] = {}
    for sample, err in failures:
        by_error.setdefault(err, []).append(sample)
    for err, hit in list(by_error.items())[:5]:
        s = hit[0]
        where = (f"sample {s.index}" if len(hit) == 1 else f"{len(hit)} of {total} samples (first: sample {s.index})")
        logger.warning("reward %s failed on %s (group %d, label %r, response %r): %s; scored %s",
                       fn_name, where, s.group_index, s.label, s.response[:200], err, on_error)
    if len(by_error) > 5:
        logger.warning("reward %s: %d more kinds of failure", fn_name, len(by_error) - 5)


async def ascore_samples(
    samples: list[Sample], fn: RewardFn, on_error: float = 0.0, max_workers: int = 8,
    timeout_s: float | None = None, stop: Callable[[], bool] | None = None,
) -> ScoreReport:
    """Score concurrently (asyncio; sync rewards in daemon threads, at most max_workers at a
    time); sets `sample.reward` (and `sample.reward_error` for failures) too.

    A call that raises, returns a non-number, or runs past `timeout_s` seconds scores
    `on_error`; repeated failures are logged once per kind. `stop()` is polled while scoring:
    once it returns True the unfinished calls are abandoned and RewardStopped is raised.
    """
    loop = asyncio.get_running_loop()
    fn_name = getattr(fn, "__name__", repr(fn))
    slots = asyncio.Semaphore(max_workers)
    failures: list[tuple[Sample, str]] = []
    timeouts = 0

    async def call(arg):
        async with slots:
            work = fn(arg) if is_async(fn) else _in_daemon_thread(loop, fn, arg)
            return await asyncio.wait_for(work, timeout_s)

    def failed(targets: list[Sample], e: BaseException) -> list[float]:
        nonlocal timeouts
        if isinstance(e, asyncio.TimeoutError):
            timeouts += len(targets)
            err = f"no result within reward_timeout_s={timeout_s:g} s (timed out)"
        else:
            err = repr(e)
        for s in targets:
            s.reward_error = err
            failures.append((s, err))
        return [on_error] * len(targets)

    async def score_batched() -> list[float]:
        try:
            values = await call(samples)
        except Exception as e:
            return failed(samples, e)
        if not isinstance(values, list | tuple) or len(values) != len(samples):
            n = len(values) if isinstance(values, list | tuple) else None
            return failed(samples, TypeError(
                f"batched reward returned {type(values).__name__}{f' of length {n}' if n is not None else ''} for "
                f"{len(samples)} samples; expected a list with one number per sample"))
        out = []
        for s, v in zip(samples, values):
            try:
                out.append(_as_reward(v))
            except TypeError as e:
                out += failed([s], e)
        return out

    async def score_one(sample: Sample) -> float:
        try:
            return _as_reward(await call(sample))
        except Exception as e:
            return failed([sample], e)[0]

    async def score_all() -> list[float]:
        if getattr(fn, "batched", False):
            return await score_batched()
        return list(await asyncio.gather(*(score_one(s) for s in samples)))

    task = asyncio.ensure_future(score_all())
    while not task.done():
        await asyncio.wait([task], timeout=0.1)
        if stop is not None and not task.done() and stop():
            task.cancel()
            raise RewardStopped(f"stop requested while scoring {len(samples)} samples with reward {fn_name}")
    rewards = task.result()
    for s, r in zip(samples, rewards):
        s.reward = r
    if failures:
        _log_failures(fn_name, failures, len(samples), on_error)
    return ScoreReport(rewards, len(failures), timeouts)


def score_samples(
    samples: list[Sample], fn: RewardFn, on_error: float = 0.0, max_workers: int = 8,
    timeout_s: float | None = None, stop: Callable[[], bool] | None = None,
) -> ScoreReport:
    """Synchronous entry point of `ascore_samples` (must not be called inside a running event loop)."""
    return asyncio.run(ascore_samples(samples, fn, on_error, max_workers, timeout_s, stop))
