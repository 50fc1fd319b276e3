"""Loss normalisation that is exact under packing, gradient accumulation and data parallel.

Every loss is `sum_t weight_t * loss_t / denom`, where the per-token weight and the global
denominator are fixed before the step from the whole global batch (all micro-batches on all
ranks), so the gradient does not depend on how the batch was split:

    mode         weight_t                      denom
    token_mean   mask_t                        masked tokens, all ranks
    seq_mean     mask_t / masked tokens of t's seq    sequences with a masked token, all ranks
    constant     mask_t / C                    sequences, all ranks     (Dr.GRPO: fixed length C)

A loss function returns `loss_sum = sum_t weight_T * per_token_loss_T` over its micro-batch;
the trainer divides by `denom`. FSDP averages gradients over the dp ranks, so the trainer
also multiplies by the dp world size to turn that average back into the global sum.
"""

from __future__ import annotations

from enum import Enum

import torch

from miles_fsdp.parallel.reduce import all_reduce_sum
from miles_fsdp.train.packing import MicroBatch


class LossNorm(str, Enum):
    token_mean = "token_mean"
    seq_mean = "seq_mean"
    constant = "constant"


def assign_weights(
    micro_batches: list[MicroBatch], norm: LossNorm | str, constant: float = 1.0, group=None
) -> float:
    """Set `mb.weight_T` on every micro-batch and return the global denominator."""
    norm = LossNorm(norm)
    n_tok = 0.0
    n_seq = 0.0
    for mb in micro_batches:
        if mb.dummy:
            mb.weight_T = torch.zeros_like(mb.mask_T)
            continue
        seg = torch.repeat_interleave(torch.arange(len(mb.seq_index)), torch.diff(mb.cu_seqlens.long()))
        per_seq_B = torch.zeros(len(mb.seq_index)).index_add_(0, seg, mb.mask_T)
        n_tok += float(per_seq_B.sum())
        n_seq += float((per_seq_B > 0).sum())
        if norm is LossNorm.token_mean:
            mb.weight_T = mb.mask_T.clone()
        elif norm is LossNorm.seq_mean:
            mb.weight_T = mb.mask_T / per_seq_B.clamp(min=1)[seg]
        else:
            mb.weight_T = mb.mask_T / constant
    n_tok, n_seq = all_reduce_sum([n_tok, n_seq], group)
    denom = n_tok if norm is LossNorm.token_mean else n_seq
    if denom <= 0:
        raise ValueError("the global batch has no trained token (every loss_mask is 0); check the data's masks")
    return denom


def sft_loss(logp_T: torch.Tensor, entropy_T: torch.Tensor | None, mb: MicroBatch):
    """Negative log-likelihood of the masked targets, weighted for the global denominator."""
    w_T = mb.weight_T.to(logp_T.device, non_blocking=True)
    loss_sum = -(logp_T * w_T).sum()
    return loss_sum, {"train/nll": loss_sum.detach()}
