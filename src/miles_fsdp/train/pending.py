"""A train step's metrics, read when the caller wants them instead of when the step is queued.

Trainer.train_step_async queues a step and returns PendingMetrics at once, so the host packs,
pins and launches the next step while the device still runs this one (a sync at every step's
end leaves the device idle for the host's start of the next: ~4 ms of a 57 ms 4k step on an
H100, twenty-ninth run). What the metrics need from the device travels in one float64 tensor,
summed over the ranks on the device where that is asked (no host collective, so ranks may read
their metrics at different times or not at all), then copied to pinned host memory behind an
event: result() waits for that event only, never for work queued after it.

StepTimer: a step's time is the device queue's, from an event recorded at the step's start
(which the device reaches only once the previous step's work is done) to one at its end; on a
CPU device, whose ops run as they are called, the host's time.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist


class StepTimer:
    """Marks each step's start and end on a device's current stream (CUDA events) or, on CPU,
    the host's clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start) -> tuple[Callable[[], float], object]:
        """(seconds, end): seconds() is the step's time once `end` has been reached (end is None
        on CPU, where it has been already)."""
        if not self.cuda:
            dt = time.perf_counter() - start
            return (lambda: dt), None
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return (lambda: start.elapsed_time(end) / 1e3), end


class PendingMetrics:
    """One step's metrics: `result()` (a dict of floats) waits for the step's end, then builds
    them from its values with `finish(values, seconds)`. `ready()`: whether that would not wait."""

    def __init__(self, values: torch.Tensor, finish: Callable[[list[float], float], dict[str, float]],
                 timer: StepTimer, start):
        if values.is_cuda:  # one copy to pinned memory, queued behind the step's work
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            values = host
        self._values, self._finish = values, finish
        self._seconds, self._end = timer.stop(start)
        self._metrics: dict[str, float] | None = None

    def ready(self) -> bool:
        return self._metrics is not None or self._end is None or self._end.query()

    def result(self) -> dict[str, float]:
        if self._metrics is None:
            if self._end is not None:
                self._end.synchronize()
            self._metrics = self._finish(self._values.tolist(), self._seconds())
            self._values = self._finish = None  # built once: let go of the step's tensors
        return self._metrics


def float64_vector(values: list[torch.Tensor]) -> torch.Tensor:
    """The values (tensors of one device, flattened, in order) as one float64 vector."""
    return torch.cat([v.reshape(-1).to(torch.float64) for v in values])


def device_sums(values: list[torch.Tensor], group) -> torch.Tensor:
    """float64_vector(values) summed over `group`'s ranks on their device (queued: no host wait
    on CUDA); float64 keeps counts exact to 2**53."""
    t = float64_vector(values)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


class OneStepBehind:
    """A train loop's queued steps: each step's metrics are read once the next step is queued
    (push), or on flush() (before a checkpoint, at the end, on a failure), so the host never waits
    for a step while it could queue the next; read, they go to `history`, `logger.log(step, m)`
    and `progress.update(step, m)` (observe/metrics.py, observe/progress.py)."""

    def __init__(self, history: list, logger, progress):
        self._history, self._logger, self._progress = history, logger, progress
        self._held: tuple[int, PendingMetrics] | None = None

    def push(self, step: int, pending: PendingMetrics) -> None:
        self.flush()
        self._held = (step, pending)

    def flush(self) -> None:
        if self._held is not None:
            (step, pending), self._held = self._held, None
            metrics = pending.result()
            self._history.append(metrics)
            self._logger.log(step, metrics)
            self._progress.update(step, metrics)
