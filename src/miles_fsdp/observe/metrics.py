"""Per-step metrics: `metrics.jsonl` (one JSON object per step, always with `step`) and
tensorboard, both in the run directory. Only rank 0 writes; other ranks get a no-op logger.

Metric names are API (the RL loop, dashboards and docs read them): `train/loss`,
`train/grad_norm`, `train/lr`, `perf/tokens_per_s`, `perf/mfu`, `perf/peak_mem_gib`,
`perf/reserved_gib` (CUDA: the allocator's peak reserve, CUDA graph pools included),
`time/<phase>_s`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from miles_fsdp.errors import UserError

logger = logging.getLogger(__name__)


def drop_rows_after(path: str | Path, step: int) -> int:
    """Resuming at `step`: remove the rows of a jsonl log with a larger "step" (they were
    written after the checkpoint and the resumed run writes them again). Returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    keep = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            keep.append(ln)
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(lines) and not ln.endswith("\n"):  # the half-written row of a crash
                logger.warning("%s:%d: dropped a torn last row (the run stopped while writing it)", path, i)
                continue
            raise MetricsFileError(f"{path}:{i}: not a JSON row; fix or delete that line (or move the file "
                                   "aside) before resuming") from None
        if row.get("step", 0) <= step:
            keep.append(ln)
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)  # atomic: a crash here leaves the old or the new file, whole
    return len(lines) - len(keep)


class MetricsFileError(UserError, ValueError):
    """A run's jsonl log holds a line that is not JSON (not just a torn last row)."""


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        """resume_step: continuing a run from that step's checkpoint; rows after it are dropped."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            drop_rows_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (for tests and tools)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Timers:
    """Wall time per phase; `with timers("rollout"): ...` then `timers.pop()` -> {"time/rollout_s": s}.

    `sync` (e.g. torch.cuda.synchronize) runs at both ends so GPU work is counted in its phase.
    """

    def __init__(self, sync=None):
        self._sync = sync
        self._acc: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        if self._sync is not None:
            self._sync()
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(phase):  # a named range in profiler traces
                yield
        finally:
            if self._sync is not None:
                self._sync()
            self._acc[phase] = self._acc.get(phase, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}_s": v for k, v in self._acc.items()}
        self._acc = {}
        return out
