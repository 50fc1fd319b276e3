"""Frozen reference policy for the KL term: a second copy of the initial weights, parallelized
on the trainer's mesh like the policy (on one rank without FSDP: parallel/local.py), optionally
kept on the CPU between uses (FSDP2 CPUOffloadPolicy: each block is copied to the device only
while it runs)."""

from __future__ import annotations

import torch
import torch.nn as nn

from miles_fsdp.parallel import ParallelConfig, parallelize
from miles_fsdp.train.packing import MicroBatch
from miles_fsdp.train.scoring import ScoringSpec
from miles_fsdp.train.trainer import Trainer, pad_micro_batches, packed_logprobs


class ReferencePolicy:
    def __init__(self, model: nn.Module, trainer: Trainer, cpu_offload: bool = False):
        """`model`: unsharded copy of the initial policy weights (e.g. `models.load_model`)."""
        cfg = ParallelConfig(replicate=trainer.cfg.parallel.replicate, param_dtype=trainer.cfg.parallel.param_dtype,
                             activation_checkpointing=False, cpu_offload=cpu_offload)
        model.requires_grad_(False)
        self.model, self.local = parallelize(model, trainer.mesh, cfg, trainer.device)
        self.model.eval()
        self.device, self.group = trainer.device, trainer.group

    @torch.no_grad()
    def ref_logprobs(self, micro_batches: list[MicroBatch], spec: ScoringSpec) -> list[torch.Tensor]:
        """fp32 log-prob of every trained target position under the reference (0 elsewhere),
        scored as the policy is (`spec`: temperature, top-k/top-p, kernel mode), one [T] tensor per micro-batch.
        Collective: every rank must call it."""
        out = []
        with self.local.compute():
            for mb in pad_micro_batches(micro_batches, self.group):
                logp_T, _ = packed_logprobs(self.model, mb, self.device, spec, trained_only=True)
                if not mb.dummy:
                    out.append(logp_T)
        self.local.free()  # no compute-dtype copy held between uses (cast again next time)
        return out
