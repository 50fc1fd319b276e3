"""torch.profiler traces of chosen steps: `--profile.steps 3 4` in `miles-fsdp rl` / `sft`.

Each profiled step writes, per rank, a Chrome/Perfetto trace (open in https://ui.perfetto.dev
or chrome://tracing) and a table of the ops that took the most time:

    RUN_DIR/profile/step_00003_rank0.json   trace; the loop's phases (rollout, train, sync, ...)
                                            appear as named ranges (observe.metrics.Timers)
    RUN_DIR/profile/step_00003_rank0.txt    the step's wall time; where it went (trace_summary.py:
                                            device busy vs span, host time per thread by top-level
                                            op); top ops by device time (CPU time on CPU)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from miles_fsdp.observe.trace_summary import format_summary, summarize

logger = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    steps: tuple[int, ...] = ()
    """Steps to profile (1-based, as logged); empty = none."""
    dir: str = ""
    """Where traces go; empty = RUN_DIR/profile."""
    memory: bool = False
    """Also record tensor allocations (memory timeline in the trace; slower)."""
    row_limit: int = 40
    """Rows of the op table."""

    def __post_init__(self):
        self.steps = tuple(self.steps)
        if any(s < 1 for s in self.steps):
            raise ValueError(f"profile.steps={self.steps}: steps are 1-based (the first step is 1)")
        if self.row_limit < 1:
            raise ValueError(f"profile.row_limit={self.row_limit}: must be >= 1")


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, run_dir: str | Path, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.dir = Path(cfg.dir or Path(run_dir) / "profile")

    def __call__(self, step: int):
        """Context manager around step `step` (1-based): profiles it if it was asked for."""
        if step not in self.cfg.steps:
            return contextlib.nullcontext()
        return self._profile(step)

    @contextlib.contextmanager
    def _profile(self, step: int):
        cuda = torch.cuda.is_available()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        if cuda:  # steps queued before this one (train_step_async) end outside its trace
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts, profile_memory=self.cfg.memory) as prof:
            t0 = time.perf_counter()
            yield
            if cuda:
                torch.cuda.synchronize()
            wall_ms = 1e3 * (time.perf_counter() - t0)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"step_{step:05d}_rank{self.rank}"
        prof.export_chrome_trace(str(stem.with_suffix(".json")))
        events = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        head = f"step {step}, rank {self.rank}: wall {wall_ms:.1f} ms (profiler on)"
        # a device busy far below its span: the step waits on the host (launches, syncs)
        where = format_summary(summarize(json.loads(stem.with_suffix(".json").read_text())))
        table = events.table(sort_by=sort, row_limit=self.cfg.row_limit)
        stem.with_suffix(".txt").write_text(f"{head}\n{where}\n{table}\n")
        logger.info("profiled %s: %s.json / .txt", head, stem)
