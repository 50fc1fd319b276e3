"""What an RL run keeps besides the rollout: reference log-probs, checkpoints, weight sync.

A checkpoint (train/checkpoint.py, DCP) holds the policy, optimizer, LR schedule, RNG and
step; the RL loop adds the data position. Rollout seeds are a function of (seed, step,
rank, prompt), so resuming at step k regenerates exactly the samples a straight run would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from miles_fsdp.data.sample import Sample
from miles_fsdp.rl.remote import RemoteEngine
from miles_fsdp.rl.step import to_train_seqs
from miles_fsdp.train.checkpoint import CheckpointError, load_newest_good, save_checkpoint
from miles_fsdp.train.export import export_hf
from miles_fsdp.train.packing import unpack
from miles_fsdp.train.reference import ReferencePolicy
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.weight_sync import iter_weight_buckets


def reference_logprobs(reference: ReferencePolicy, trainer, samples: list[Sample], spec: ScoringSpec) -> list[list[float]]:
    """Each sample's response tokens scored by the reference policy as `spec` says (one list
    per sample, one value per response token). Collective."""
    seqs = to_train_seqs(samples)
    mbs = trainer.pack(seqs)
    per_seq: dict[int, torch.Tensor] = {}
    for mb, logp_T in zip(mbs, reference.ref_logprobs(mbs, spec)):
        per_seq.update(unpack(mb, logp_T.cpu()))
    return [per_seq[i][len(s.prompt_ids):].tolist() for i, s in enumerate(samples)]


def sync_engine(trainer, engine, dtype: torch.dtype, version: int, weights_dir: str | Path = "") -> None:
    """Gather `param.to(dtype)` from the FSDP shards and swap it into the engine. Collective.

    A RemoteEngine gets it through `weights_dir`/v<version> (an HF checkpoint rank 0 writes
    and every server loads); the previous version's directory is then removed."""
    if isinstance(engine, RemoteEngine):
        out = Path(weights_dir) / f"v{version:06d}"
        export_hf(trainer.model, out, dtype=dtype)  # collective; rank 0 writes
        error = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                engine.update_weights_from(str(out.resolve()), version)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
            for old in Path(weights_dir).glob("v*"):
                if old != out and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        failed = torch.tensor([float(error is not None)])
        if dist.is_initialized():  # also the barrier: no rank samples before the servers hold v
            dist.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("rank 0 could not update the rollout servers' weights; its error says why")
        return
    weights = {}
    for bucket in iter_weight_buckets(trainer.model, dtype):
        weights.update(bucket)
    engine.update_weights(weights, version=version)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir, trainer, dataset) -> Path:
    return save_checkpoint(trainer, checkpoint_root(run_dir), extra={"dataset": dataset.state_dict()}, keep=2)


def resume(run_dir, trainer, dataset) -> int:
    """Load the newest checkpoint under run_dir/checkpoints that loads (a corrupt newer one
    is skipped, with a warning); returns the step to continue from."""
    found = load_newest_good(trainer, checkpoint_root(run_dir))
    if found is None:
        raise CheckpointError(
            f"resume=True but {checkpoint_root(run_dir)} holds no step_* checkpoint; run without --resume "
            "to start fresh, or point --run-dir at the run to continue")
    _, extra = found
    if dataset is not None and "dataset" in extra:
        dataset.load_state_dict(extra["dataset"])
    return trainer.step
