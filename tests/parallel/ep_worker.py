"""torchrun worker for test_expert_parallel.py.

    torchrun --nproc-per-node 2 tests/parallel/ep_worker.py CKPT OUT_DIR EP [AC]
Rank r takes sequences r::world of the global batch; rank 1 packs one sequence per
micro-batch and rank 0 two (so rank 0 also runs dummy micro-batches through the EP path).
Writes OUT_DIR/rank<r>.pt: forward outputs per micro-batch, full gradients of one backward,
the losses of 2 training steps and the full weights after them.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import SEQ_LEN, forward_outputs, full_grads, full_weights, global_batch, make_trainer, pg_loss  # noqa: E402

from miles_fsdp.models import ModelArgs, Transformer, load_model  # noqa: E402
from miles_fsdp.parallel import apply_ep, init_distributed, shutdown_distributed  # noqa: E402


def bad_configs(mesh) -> list[str]:
    """apply_ep's messages for 3 experts over EP 2, and for a dense model (meta, no weights needed)."""
    args = ModelArgs.from_hf(sys.argv[1])
    errors = []
    for bad in (dataclasses.replace(args, n_experts=3), dataclasses.replace(args, n_experts=0)):
        with torch.device("meta"):
            model = Transformer(bad)
        try:
            apply_ep(model, mesh)
        except ValueError as e:
            errors.append(str(e))
    return errors


def main(ckpt: str, out: str, ep: int, ac: bool) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = global_batch()[rank::world]
    budget = 2 * SEQ_LEN if rank == 0 else SEQ_LEN
    trainer = make_trainer(load_model(ckpt), budget, expert_parallel=ep, activation_checkpointing=ac)
    mbs = trainer.pack(mine)
    result = {"outputs": forward_outputs(trainer, mbs), "budget": budget}
    trainer.backward(mbs, pg_loss)
    result["grads"] = full_grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    result["local_expert_shape"] = tuple(trainer.model.layers[0].moe.w_gate.to_local().shape) if ep > 1 else None
    result["losses"] = [trainer.train_step(mbs, pg_loss)["train/loss"] for _ in range(2)]
    result["weights"] = full_weights(trainer)
    result["errors"] = bad_configs(trainer.mesh) if ep > 1 else []
    torch.save(result, Path(out) / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "ac")
    # results are on disk and the group is down; skip interpreter teardown, where gloo
    # worker threads can still abort the process (pytorch/pytorch#179291)
    sys.stdout.flush()
    os._exit(0)
