"""What an RL run keeps besides the policy: the reference policy, checkpoints, the HF export."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import miles_kernels as mk
from miles_fsdp.models import packed_inputs, save_hf
from miles_fsdp.parallel import apply_fsdp
from miles_fsdp.rl.setup import full_weights, load_model
from miles_fsdp.train.packing import MicroBatch


class ReferencePolicy:
    """Frozen copy of the initial policy, sharded like the trainer's, for KL terms."""

    def __init__(self, path: str, trainer, device: torch.device):
        model = load_model(path, torch.float32, "cpu")
        model.requires_grad_(False)
        if not trainer.cfg.parallel.cpu_offload:
            model.to(device)
        self.model = apply_fsdp(model, trainer.mesh, param_dtype=trainer.cfg.parallel.compute_dtype(device),
                                reduce_dtype=torch.float32, cpu_offload=trainer.cfg.parallel.cpu_offload)
        self.model.eval()
        self.device, self.temperature = device, trainer.cfg.temperature

    @torch.no_grad()
    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        _, meta, slot_T = packed_inputs(mb.cu_seqlens.to(self.device))
        hidden_TD = self.model(mb.ids_T.to(self.device), mb.pos_T.to(self.device), meta, slot_T)
        return mk.logprobs(self.model.logits(hidden_TD), mb.targets_T.to(self.device), self.temperature)[0]


def attach_ref_logprobs(reference: ReferencePolicy, mbs: list[MicroBatch], group=None) -> None:
    """Set mb.fields["ref_logp"] (aligned like the targets). Collective over the dp group."""
    n = torch.tensor([len(mbs)])
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    for i in range(int(n)):
        if i < len(mbs):
            mbs[i].fields["ref_logp"] = reference.logprobs(mbs[i]).cpu()
        else:  # keep FSDP collectives in step with ranks that have more micro-batches
            reference.logprobs(mbs[0]) if mbs else None


def export_hf(trainer, path: Path) -> None:
    """Gather the full fp32 policy and write it as an HF checkpoint (rank 0 writes); the
    config and tokenizer files come from the checkpoint the run started from."""
    weights = full_weights(trainer.model, torch.float32, torch.device("cpu"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf(weights, path, trainer.model.args)
    if dist.is_initialized():
        dist.barrier()
