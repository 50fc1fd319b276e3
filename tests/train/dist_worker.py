"""torchrun worker for the 2-rank tests: gradients of each split, and a short training run.

    torchrun --nproc-per-node 2 tests/train/dist_worker.py OUT.pt
Rank r takes sequences r::world of the global batch. Writes {case: grads} and the losses
of 3 training steps to OUT.pt (rank 0); exits non-zero where the same steps queued with
train_step_async read other losses on any rank.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import NORM_CONSTANT, SEQ_LEN, full_grads, global_batch, make_trainer, pg_loss  # noqa: E402
from tiny_model import TinyLM  # noqa: E402

from miles_fsdp.parallel import init_distributed, shutdown_distributed  # noqa: E402


def main(out: str) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = global_batch()[rank::world]
    result = {}
    # (norm, per-rank token budget): 4 seqs/rank as 1x4, 2x2, 4x1; "uneven": rank 0 packs
    # 1 micro-batch, rank 1 packs 4 (exercises the dummy micro-batches).
    for norm in ("token_mean", "seq_mean", "constant"):
        for name, budget in (("1", 4 * SEQ_LEN), ("2", 2 * SEQ_LEN), ("4", SEQ_LEN),
                             ("uneven", 4 * SEQ_LEN if rank == 0 else SEQ_LEN)):
            trainer = make_trainer(TinyLM(), budget)
            trainer.backward(trainer.pack(mine), pg_loss, norm=norm, norm_constant=NORM_CONSTANT)
            result[(norm, name)] = full_grads(trainer)
    trainer = make_trainer(TinyLM(), 2 * SEQ_LEN)
    steps = [trainer.train_step(trainer.pack(mine), pg_loss) for _ in range(3)]
    result["losses"], result["tokens"] = [m["train/loss"] for m in steps], [m["train/tokens"] for m in steps]
    # the same steps queued (train_step_async): rank 0 reads each step's metrics at once, rank 1
    # only after all three, last first; the ranks' sums are made as queued, so both get train_step's
    trainer = make_trainer(TinyLM(), 2 * SEQ_LEN)
    pending = []
    for _ in range(3):
        pending.append(trainer.train_step_async(trainer.pack(mine), pg_loss))
        if rank == 0:
            pending[-1].result()
    async_losses = [p.result()["train/loss"] for p in pending[::-1]][::-1]
    if async_losses != result["losses"]:
        raise SystemExit(f"rank {rank}: train_step_async losses {async_losses} != train_step's {result['losses']}")
    if rank == 0:
        torch.save(result, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    # results are on disk and the group is down; skip interpreter teardown, where gloo
    # worker threads can still abort the process (pytorch/pytorch#179291)
    sys.stdout.flush()
    os._exit(0)
