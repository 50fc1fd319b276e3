"""AdamW on the fp32 parameters (sharded under FSDP) and a warmup + constant/cosine LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (reached after `warmup_steps`)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr over this many steps."""
    schedule: str = "constant"
    """After warmup: "constant" or "cosine" (decays to `min_lr_ratio * lr` at `total_steps`)."""
    total_steps: int = 0
    """Length of the cosine schedule in steps (required for "cosine")."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak lr."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr={self.lr}: must be > 0")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"OptimConfig.schedule={self.schedule!r}: use 'constant' or 'cosine'")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimConfig.total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps} "
                f"for the cosine schedule"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("OptimConfig: warmup_steps and grad_clip must be >= 0, min_lr_ratio in [0, 1]")


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over `params` (those that require grad) and its schedule."""
    params = [p for p in params if p.requires_grad]
    # foreach=False: the foreach kernels group tensors by device/dtype and DTensor mesh;
    # per-parameter updates keep CPU offload and mixed meshes simple. fused is CUDA-only.
    fused = all(p.device.type == "cuda" for p in params)
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=fused or None, foreach=None if fused else False,
    )
    # the fused kernel writes the parameters without bumping their version counters, which
    # parallel/local.py reads to know when to refresh its compute-dtype copies: bump them
    opt.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(params))
    sched = LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched
