"""torchrun worker for test_hsdp.py and test_resharded_resume.py.

    torchrun --nproc-per-node N tests/parallel/train_worker.py CKPT OUT_DIR \
        [--replicate R] [--ep E] [--steps S] [--save-at K --save-dir D] [--resume STEP_DIR]
Builds the trainer on the tiny MoE checkpoint (optionally resuming), then `parallel_helpers.train_run`.
Writes OUT_DIR/rank<r>.pt.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import full_state, make_trainer, train_run  # noqa: E402

from miles_fsdp.models import load_model  # noqa: E402
from miles_fsdp.parallel import init_distributed, shutdown_distributed  # noqa: E402
from miles_fsdp.train.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--replicate", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--resume", default=None)
    a = ap.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = make_trainer(load_model(a.ckpt), replicate=a.replicate, expert_parallel=a.ep)
    result = {"mesh": trainer.mesh.mesh_dim_names}
    if a.resume:
        result["extra"] = load_checkpoint(trainer, a.resume)
        result["loaded"] = full_state(trainer)
    result.update(train_run(trainer, rank, world, a.steps, a.save_at, a.save_dir))
    torch.save(result, Path(a.out) / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
    # results are on disk and the group is down; skip interpreter teardown, where gloo
    # worker threads can still abort the process (pytorch/pytorch#179291)
    sys.stdout.flush()
    os._exit(0)
