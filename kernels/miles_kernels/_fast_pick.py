"""Fast mode's linears: per shape, whichever of cuBLAS and the invariant kernel ran faster.

Fast mode promises speed, not bits, and the invariant kernel is one of its options: where it
beats cuBLAS at a shape, fast mode runs it, so fast mode's linears are never slower than
invariant mode's by more than a timing's noise. Each key (the op, M rounded up to a power of
two, the weights' widths, K, dtype, bias, device) is timed once, eagerly: both forwards after a
warm call each (which also compiles the kernel), interleaved, the median of REPS CUDA-event
reads each. Nothing is timed while a CUDA graph is being captured (cuBLAS, the choice not kept:
the next eager call times it), nor where the outputs pass MAX_TIMED_BYTES, timing runs out of
memory or the invariant kernel raises (cuBLAS, kept: large GEMMs, where the two read within a few
percent and a second output could run a full GPU out of memory; a kernel error is logged).
"""

from __future__ import annotations

import logging
import statistics
from typing import Callable

import torch

log = logging.getLogger(__name__)

PICK = True  # False: fast mode's linears by cuBLAS only (the A/B: tools/bench/with_tiles.py --fast-pick off)
REPS = 5
MAX_TIMED_BYTES = 256 << 20
_CHOICE: dict[tuple, bool] = {}  # key -> the invariant kernel serves it


def ours(op: str, x_MK: torch.Tensor, ws, bs, vendor: Callable, mine: Callable) -> bool:
    """Whether fast mode runs `mine(x, ws, bs)` (the invariant kernel) rather than `vendor(x, ws,
    bs)` (cuBLAS) for this 2-D x and these weights: the faster at this key, timed on first use."""
    if not PICK or not x_MK.is_cuda or x_MK.shape[0] == 0:
        return False
    k = key(op, x_MK, ws, bs)
    hit = _CHOICE.get(k)  # the common case: no capture query, nothing built
    if hit is not None:
        return hit
    out_bytes = x_MK.shape[0] * sum(w.shape[0] for w in ws) * x_MK.element_size()
    return choose(k, out_bytes, lambda: vendor(x_MK, ws, bs), lambda: mine(x_MK, ws, bs),
                  torch.cuda.is_current_stream_capturing())


def key(op: str, x_MK: torch.Tensor, ws, bs) -> tuple:
    """What a choice is kept for: the op, M rounded up to a power of two, the widths, K, dtype,
    bias or not, device."""
    M, K = x_MK.shape
    m = 1 << max(M - 1, 0).bit_length()
    return op, m, tuple(w.shape[0] for w in ws), K, x_MK.dtype, bs is not None, x_MK.device


def choose(key: tuple, out_bytes: int, vendor: Callable, mine: Callable, capturing: bool) -> bool:
    """The kept choice for key, else time vendor() against mine() and keep the faster (ties: mine)."""
    hit = _CHOICE.get(key)
    if hit is not None:
        return hit
    if capturing:
        return False
    if out_bytes > MAX_TIMED_BYTES:
        _CHOICE[key] = False
        return False
    try:
        with torch.no_grad():
            t_vendor, t_mine = _times(vendor, mine)
        pick = t_mine <= t_vendor
    except torch.cuda.OutOfMemoryError:
        pick = False
    except Exception as e:  # noqa: BLE001 - fast mode promises speed: cuBLAS serves, and the error is told
        log.warning("fast mode: the invariant linear kernel raised %s: %s at %s; cuBLAS serves this shape",
                    type(e).__name__, e, key)
        pick = False
    _CHOICE[key] = pick
    return pick


def _times(*fns: Callable) -> list[float]:
    """Median ms of each fn over REPS CUDA-event reads, after a warm call each; the order alternates
    every round so neither runs second every time."""
    for fn in fns:
        fn()
    reads: list[list[float]] = [[] for _ in fns]
    events = []
    for r in range(REPS):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[i]()
            end.record()
            events.append((i, start, end))
    events[-1][2].synchronize()
    for i, start, end in events:
        reads[i].append(start.elapsed_time(end))
    return [statistics.median(r) for r in reads]
