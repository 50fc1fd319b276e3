"""torchrun worker for the 2-rank draft test: gradients of one step with the MTP draft
training beside the policy (a real tiny Transformer, each draft module its own FSDP unit).

    torchrun --nproc-per-node 2 tests/train/draft_worker.py CKPT OUT.pt
Rank r takes sequences r::world; rank 0 packs one micro-batch and rank 1 one per sequence
(so rank 0 runs dummy micro-batches through the draft too). Writes {name: grad} and the
metrics of two draft-only steps (Trainer.train_draft_step) to OUT.pt (rank 0).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import full_grads, pg_loss  # noqa: E402

from miles_fsdp.models import load_model  # noqa: E402
from miles_fsdp.parallel import init_distributed, shutdown_distributed  # noqa: E402
from miles_fsdp.train.draft import DraftConfig  # noqa: E402
from miles_fsdp.train.packing import TrainSeq  # noqa: E402
from miles_fsdp.train.trainer import Trainer, TrainerConfig  # noqa: E402


def draft_batch(vocab: int = 320) -> list[TrainSeq]:
    """Six sequences with prompts, responses and a masked tool span, and advantages."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((14, 23, 9, 31, 17, 26)):
        mask = [0] * (3 + i % 3) + [1] * (n - 3 - i % 3)
        if n > 20:
            mask[12:15] = [0, 0, 0]
        out.append(TrainSeq(torch.randint(0, vocab, (n,), generator=g).tolist(), mask,
                            {"adv": torch.randn(n, generator=g).tolist()}))
    return out


def draft_grads(ckpt: str, seqs: list[TrainSeq], budget: int) -> dict[str, torch.Tensor]:
    trainer = Trainer(load_model(ckpt, n_mtp=2), TrainerConfig(max_tokens_per_micro_batch=budget), draft=DraftConfig())
    trainer.backward(trainer.pack(seqs), pg_loss)
    return full_grads(trainer)


def draft_only_losses(ckpt: str, seqs: list[TrainSeq], budget: int) -> list[float]:
    trainer = Trainer(load_model(ckpt, n_mtp=1), TrainerConfig(max_tokens_per_micro_batch=budget), draft=DraftConfig(),
                      train_trunk=False)
    return [trainer.train_draft_step(trainer.pack(seqs))["draft/loss"] for _ in range(2)]


def main(ckpt: str, out: str) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, budget = draft_batch()[rank::world], 128 if rank == 0 else 31
    grads = draft_grads(ckpt, mine, budget)
    grads["draft_only_losses"] = torch.tensor(draft_only_losses(ckpt, mine, budget))
    if rank == 0:
        torch.save(grads, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (see dist_worker.py)
