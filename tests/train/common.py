"""Shared helpers for trainer tests (imported by the tests and by the torchrun worker)."""

import torch

from miles_fsdp.train.optim import OptimConfig
from miles_fsdp.train.packing import TrainSeq
from miles_fsdp.train.trainer import Trainer, TrainerConfig

SEQ_LEN = 6


def global_batch(n: int = 8, vocab: int = 64, seed: int = 0) -> list[TrainSeq]:
    """n sequences of SEQ_LEN tokens with different prompt lengths (so masked token counts
    differ per sequence and token_mean != seq_mean) and a per-token advantage field."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        prompt = 1 + i % 4
        seqs.append(TrainSeq(
            tokens=torch.randint(0, vocab, (SEQ_LEN,), generator=g).tolist(),
            loss_mask=[0] * prompt + [1] * (SEQ_LEN - prompt),
            fields={"adv": torch.randn(SEQ_LEN, generator=g).tolist()},
        ))
    return seqs


def pg_loss(logp_T, ent_T, mb):
    """A policy-gradient-shaped loss that uses a per-token field."""
    loss_sum = -(logp_T * mb.fields["adv"] * mb.weight_T).sum()
    return loss_sum, {"train/pg": loss_sum.detach()}


NORM_CONSTANT = 4.0  # the per-sequence length C of LossNorm.constant in these tests


def make_trainer(model, budget: int, lr: float = 1e-2, **kw) -> Trainer:
    cfg = TrainerConfig(optim=OptimConfig(lr=lr, **kw), max_tokens_per_micro_batch=budget)
    return Trainer(model, cfg)


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out
