"""torch.cuda.graph with the two guards every capture site of ours needs (engine decode and draft
graphs, the trainer's graphed trunk).

- Python's cyclic garbage collector is off while a graph captures. torch no longer collects before
  a capture, so a collection could fire inside one and free a dead engine's or trainer's objects
  (pinned buffers, events, graphs) with CUDA calls a capture forbids: the capture is invalidated.
  Seen on an H100 (2026-12-05): a draft's capture failed when other tests had run first in the
  process. With this guard taken out the failure comes back, with CUDA's "operation not permitted
  when stream is capturing" from dead graphs' reset inside the capture; with it, the same order
  passes (tools/gpu_checks.sh capture). Garbage waits for the capture's end.
- A failed capture leaves torch's default CUDA generator marked as capturing (torch < 2.13 clears
  the mark only in a successful capture_end), and every later random op on that device raised
  "Offset increment outside graph capture". The failed graph is reset and, on those releases, the
  generator given a fresh copy of its state (same seed and offset), so a caller that falls back to
  eager code, or reports the failure, leaves the process usable.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
_CAPTURE_FLAG_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@contextlib.contextmanager
def capture_graph(graph: torch.cuda.CUDAGraph, pool=None, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
    """`with capture_graph(graph, pool): ...` captures like `with torch.cuda.graph(graph, pool=pool)`."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            yield
    except BaseException:
        recover_from_failed_capture(graph)
        raise
    finally:
        if collecting:
            gc.enable()


def recover_from_failed_capture(graph: torch.cuda.CUDAGraph) -> None:
    """Drop what a failed capture left: the graph's state, and (torch < 2.13) the default
    generator's capturing mark."""
    try:
        graph.reset()
        if _CAPTURE_FLAG_TORCH and torch.cuda.is_available():
            gen = torch.cuda.default_generators[torch.cuda.current_device()]
            gen.graphsafe_set_state(gen.clone_state())
    except Exception as e:  # noqa: BLE001 - the capture's own error is the one to raise
        log.warning("cleaning up after a failed CUDA graph capture raised %s: %s (CUDA random ops may fail "
                    "from now on)", type(e).__name__, e)
