"""One run per run directory: a new run never writes into a directory that holds another.

    empty or missing          start (the directory is created)
    holds a run, resume       continue it (the caller loads its newest checkpoint)
    holds a run, overwrite    move the old run aside to DIR.old-<time>, then start; nothing is deleted
    holds a run, neither      stop before doing anything, naming both choices
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from miles_fsdp.errors import UserError

logger = logging.getLogger(__name__)


class RunDirError(UserError, ValueError):
    """The run directory holds another run and the command was not told what to do with it."""


def prepare_run_dir(path: str | Path, resume: bool, overwrite: bool, resume_flag: str | None, dir_flag: str) -> Path:
    """Check (every rank) and prepare (rank 0) `path` for a run; collective when distributed.

    resume_flag / dir_flag name the command's flags in the message (e.g. "--resume", "--run-dir");
    resume_flag None: the command cannot continue a run.
    """
    path = Path(path)
    if resume and overwrite:
        raise RunDirError(f"{resume_flag} continues the run in {path} and --overwrite moves it aside: pass one")
    held = path.is_dir() and any(path.iterdir())
    if held and not resume and not overwrite:
        raise RunDirError(
            f"{path} already holds a run ({', '.join(sorted(p.name for p in path.iterdir())[:5])}); pass "
            + (f"{resume_flag} to continue it, " if resume_flag else "")
            + f"{dir_flag} with another directory to start a new one, or --overwrite to start over "
            f"here (the old run is moved aside to {path}.old-<time>, not deleted)")
    if held and overwrite and _rank() == 0:
        aside = _free_name(path)
        path.rename(aside)
        logger.warning("--overwrite: the previous run in %s was moved to %s", path, aside)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _free_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return aside
