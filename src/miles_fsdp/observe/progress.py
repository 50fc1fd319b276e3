"""Progress display: a rich bar on a terminal, one plain line per update otherwise (logs, CI).

Only rank 0 should create one; `Progress(total, enabled=rank == 0)`.
"""

from __future__ import annotations

import sys
import time


def _fmt(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        if k in metrics:
            parts.append(f"{k.split('/')[-1]}={metrics[k]:.4g}")
    return " ".join(parts)


class Progress:
    SHOWN = ("train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s", "perf/mfu")

    def __init__(self, total: int, start: int = 0, desc: str = "train", enabled: bool = True, stream=None,
                 keys: tuple[str, ...] | None = None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.keys = keys or self.SHOWN
        self.stream = stream or sys.stderr
        self._rich = None
        self._t0 = time.perf_counter()
        if enabled and self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )
            self._task = self._rich.add_task(desc, total=total, completed=start, info="")
            self._rich.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = _fmt(metrics, self.keys)
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
        else:
            elapsed = time.perf_counter() - self._t0
            print(f"[{self.desc}] step {step}/{self.total} {info} ({elapsed:.1f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
