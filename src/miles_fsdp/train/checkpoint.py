"""DCP checkpoints: model, optimizer, LR schedule, step, RNG and caller state, resumable.

The model state holds the MTP draft's weights with the trunk's; a trainer that trains the
draft adds its optimizer (key `draft_optim`) and schedule. A checkpoint without them loads
into such a trainer with a fresh draft optimizer (a warning says so).

Layout under `CheckpointConfig.dir`:
    step_00000004/        one torch.distributed.checkpoint directory per saved step
    .tmp_step_00000006/   being written; renamed to step_... only when every rank is done,
                          so a crash never leaves a half checkpoint under a real name
Each rank stores its own RNG state (key `rng/rank<r>`); model and optimizer are saved
sharded (each rank writes its shards), so save and load are collective.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from miles_fsdp.errors import UserError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that is missing, incomplete or unreadable."""


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Directory for checkpoints; empty = the run's own (sft: OUT/checkpoints)."""
    interval: int = 0
    """Save every this many steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Keep the newest this many checkpoints (0 keeps all)."""
    resume: str = "auto"
    """"auto": continue from the newest checkpoint in `dir` if there is one; "never"; or a
    path to one step_* directory."""

    def __post_init__(self):
        if self.interval < 0 or self.keep < 0:
            raise ValueError(f"CheckpointConfig: interval={self.interval} and keep={self.keep} must be >= 0")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ValueError("CheckpointConfig.resume: use 'auto', 'never' or a step_* directory")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """Newest complete step_* directory under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def _rng_state() -> bytes:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


def _set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizers(trainer) -> dict[str, tuple]:
    """Checkpoint key -> (optimizer, schedule) of every optimizer the trainer steps."""
    out = {}
    if trainer.optimizer is not None:
        out["optim"] = (trainer.optimizer, trainer.scheduler)
    draft = getattr(trainer, "draft", None)
    if draft is not None and draft.optimizer is not None:
        out["draft_optim"] = (draft.optimizer, draft.scheduler)
    return out


def _state(trainer, extra_blob: bytes, rng_blob: bytes) -> dict:
    opts = _optimizers(trainer)
    schedules = {key: sched.state_dict() for key, (_, sched) in opts.items()}
    trainer_blob = pickle.dumps({"step": trainer.step, "scheduler": schedules.pop("optim", None), **schedules})
    state = {"model": get_model_state_dict(trainer.model), "trainer": trainer_blob, "extra": extra_blob,
             f"rng/rank{dist.get_rank()}": rng_blob}
    for key, (opt, _) in opts.items():
        state[key] = get_optimizer_state_dict(trainer.model, opt)
    return state


def _write_model_config(model, path: Path) -> None:
    # config.json + tokenizer files make a step dir self-describing for `miles-fsdp convert`
    args = getattr(model, "args", None)
    if args is None or not getattr(args, "hf_config", None):
        return
    from miles_fsdp.models.hf_io import SIDE_FILES, config_json

    (path / "config.json").write_text(json.dumps(config_json(args), indent=2, sort_keys=True))
    if args.source_dir:

        for name in SIDE_FILES:
            if (Path(args.source_dir) / name).is_file():
                shutil.copy2(Path(args.source_dir) / name, path / name)


def save_checkpoint(trainer, root: str | Path, extra: dict | None = None, keep: int = 0) -> Path:
    """Write step_<trainer.step> atomically under `root`; collective. Returns its path."""
    root = Path(root)
    final = step_dir(root, trainer.step)
    tmp = root / f".tmp_{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(trainer, pickle.dumps(extra or {}), _rng_state()), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_model_config(trainer.model, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep > 0:
            old = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))[:-keep]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(trainer, path: str | Path) -> dict:
    """Restore model, optimizer, schedule, step and this rank's RNG from `path` (a step_*
    directory); return the caller's extra state. Collective."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist; check CheckpointConfig.resume/dir")
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: no .metadata file, so this is not a complete DCP checkpoint (interrupted write?); "
            f"delete it or point CheckpointConfig.resume at another step_* directory"
        )
    rng_key = f"rng/rank{dist.get_rank()}"
    state = _state(trainer, b"", b"")
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if rng_key not in keys:  # saved with fewer ranks: this rank keeps its current RNG
            state.pop(rng_key)
        fresh_draft_optim = "draft_optim" in state and not any(k.startswith("draft_optim") for k in keys)
        if fresh_draft_optim:  # saved by a run that did not train the draft
            state.pop("draft_optim")
        dcp.load(state, checkpoint_id=str(path))
        meta, extra = pickle.loads(state["trainer"]), pickle.loads(state["extra"])
    # torch's CheckpointException is a BaseException: name it, or a corrupt file escapes as a raw traceback
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the path and the cause
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {_first_line(e)}); "
                              "it is incomplete or corrupt") from None
    set_model_state_dict(trainer.model, state["model"])
    for key, (opt, sched) in _optimizers(trainer).items():
        if key in state:
            set_optimizer_state_dict(trainer.model, opt, state[key])
            sched.load_state_dict(meta["scheduler" if key == "optim" else key])
    if fresh_draft_optim:
        logger.warning("%s holds no draft optimizer state (the run that saved it did not train the draft): "
                       "the draft's AdamW starts fresh", path)
    trainer.step = meta["step"]
    if rng_key in state:
        _set_rng_state(state[rng_key])
    return extra


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def load_newest_good(trainer, root: str | Path) -> tuple[Path, dict] | None:
    """Load the newest step_* checkpoint under `root` that loads; a corrupt newer one is
    skipped with a warning that names it (it is kept on disk). None if root holds none;
    CheckpointError if every one is broken. Collective."""
    root = Path(root)
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), reverse=True) \
        if root.is_dir() else []
    errors = []
    for path in steps:
        try:
            extra = load_checkpoint(trainer, path)
        except CheckpointError as e:
            errors.append(str(e))
            logger.warning("%s; trying the previous checkpoint", e)
            continue
        if errors:
            logger.warning("resumed from %s, the newest checkpoint that loads (skipped %d broken)", path.name,
                           len(errors))
        return path, extra
    if errors:
        raise CheckpointError(f"no checkpoint under {root} loads:\n  " + "\n  ".join(errors) +
                              "\nstart without resume (or with another run directory)")
    return None


class StopSignal:
    """SIGTERM/SIGINT set a flag instead of killing the process: the loop finishes its step,
    checkpoints and exits. `requested()` agrees across ranks (a signal may reach one rank
    a step before another), so it is collective."""

    def __init__(self):
        self._flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def local(self) -> bool:
        """This rank's flag alone (no collective): for polling inside a phase, e.g. rollout."""
        return self._flag

    def requested(self) -> bool:
        flag = torch.tensor([int(self._flag)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
