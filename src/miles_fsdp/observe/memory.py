"""Peak memory of the current device (CUDA allocator) or of the process (CPU, max RSS), and
out-of-memory errors that say what ran out and which setting to change."""

from __future__ import annotations

import resource
import sys

import torch

from miles_fsdp.errors import UserError


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GiB since the last reset (CUDA); peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


def reserved_memory_gib(device: torch.device) -> float | None:
    """Peak GiB the CUDA allocator held since the last reset: what the process takes from the
    GPU, CUDA graph pools included (a graph replay allocates nothing, so allocated peaks miss
    them). None off CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


class OutOfMemory(UserError, torch.OutOfMemoryError):
    """Out of memory, with what ran out and the settings that make it fit."""


def oom_error(e: BaseException, what: str, fixes: str) -> OutOfMemory:
    """The error to raise from `e`: what ran out of memory, the settings that fix it, then
    the allocator's own first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return OutOfMemory(f"{what} ran out of memory; {fixes}. Allocator: {first}")

