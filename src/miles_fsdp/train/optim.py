"""AdamW on the fp32 parameters (sharded under FSDP) and a warmup + constant/cosine LR schedule.

`AdamW` is torch's (fused on CUDA) with one more way to step: `step_with` takes the grads as
the backward left them (bf16 on one rank without FSDP, parallel/local.py) and updates
parameters and moments in one pass that also writes the bf16 shadows of the new parameters
(miles_kernels/_triton/adamw.py): torch's fused AdamW values bit for bit, ~30 bytes a
parameter moved against ~48 for the grad upcast, torch's step and the shadows' cast. The
trainer uses it where `OptimConfig.one_pass` allows (train/trainer.py).
"""

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
    one_pass: bool | None = None
    """The optimizer step as one pass over the bf16 grads that also writes the next forward's
    bf16 parameters (torch's AdamW values bit for bit, less memory traffic): None (default) on
    where it applies (one rank without FSDP, bf16/fp16 compute, on CUDA), else torch's fused
    AdamW; True: required (refused elsewhere); False: torch's step always."""

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


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW (its state, state_dict and schedulers as they are) plus `step_with`."""

    @torch.no_grad()
    def step_with(self, grads: dict[torch.nn.Parameter, torch.Tensor],
                  shadows: dict[torch.nn.Parameter, torch.Tensor] | None = None,
                  grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step of the parameters in `grads` from those grads (any float dtype; the
        params' .grad is not read), as the fused step() with grad_scale / found_inf set would
        take it: the same state (step counts on the device), the same values. shadows:
        {param: bf16/fp16 tensor} written with the new values in the same pass (None: none)."""
        from miles_kernels._triton.adamw import adamw_step

        stepped = []
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"] \
                    or torch.is_tensor(group["lr"]):
                raise ValueError("AdamW.step_with: amsgrad, maximize, capturable, differentiable and a tensor lr "
                                 "are step()'s only; turn them off or set optim.one_pass=False")
            params = [p for p in group["params"] if p in grads]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)  # as torch's fused step: counted first, taken back on found_inf
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                         eps=group["eps"], grad_scale=grad_scale, found_inf=found_inf)
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, p in enumerate(params):
                by_dtype.setdefault(grads[p].dtype, []).append(i)
            for idx in by_dtype.values():
                pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                ps = pick(params)
                adamw_step(ps, [_aligned(grads[p]) for p in ps], pick([st["exp_avg"] for st in states]),
                           pick([st["exp_avg_sq"] for st in states]), pick(steps),
                           [shadows[p] for p in ps] if shadows is not None else None, **hyper)
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))
            stepped += params
        self._opt_called = True  # what torch's step() wrapper records (the LR scheduler checks it)
        torch.autograd.graph.increment_version(stepped)

    def _init_state(self, p: torch.nn.Parameter) -> dict:
        """p's state as torch's fused AdamW makes it (lazily, at its first step)."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(p.device, torch.float32)  # a non-fused optimizer's host count
        for key in ("exp_avg", "exp_avg_sq"):
            if not _is_aligned(state[key]):
                state[key] = _aligned(state[key])
        if not _is_aligned(p):
            raise ValueError(f"AdamW.step_with: a parameter of shape {list(p.shape)} is not contiguous and "
                             "16-byte aligned; set optim.one_pass=False")
        return state


def _is_aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it in fresh (aligned) memory: the one-pass kernel's accesses
    are 16-byte vectors (a grad can be a view into a larger buffer at any offset)."""
    return t if _is_aligned(t) else torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def skips_on_device(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> bool:
    """Fused AdamW on plain tensors: it takes grad_scale (the clip) and found_inf (the skip) on
    the device, no host wait. FSDP's DTensor parameters keep the host check (a plain found_inf
    beside DTensors is not a dispatch we rely on)."""
    from torch.distributed.tensor import DTensor

    return (any(g.get("fused") for g in optimizer.param_groups)
            and not any(isinstance(p, DTensor) for p in params[:1]))


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """What AdamW divides the grads by (grad_scale) to clip them to max_norm as
    clip_grads_with_norm_ does (within an ulp of its product; exactly 1 under the limit); None
    where max_norm <= 0 (no clipping)."""
    if max_norm <= 0:
        return None
    return ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """torch.nn.utils.get_total_norm (2-norm) of these grads as if they were fp32: each one's
    norm in fp32 (torch's foreach norm of the bf16 grads with dtype float32 gives the bits of
    the norm of their fp32 upcasts), in the grads' order, then the norm of the norms."""
    if not grads:
        return torch.zeros(())
    dev = grads[0].device
    norms: list[torch.Tensor | None] = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        group = [grads[i] for i in idx]
        out_dtype = None if dtype == torch.float32 else torch.float32
        if dev.type == "cuda":
            got = torch._foreach_norm(group, 2, dtype=out_dtype)
        else:  # get_total_norm's path where foreach has no support
            got = [torch.linalg.vector_norm(g, 2, dtype=out_dtype) for g in group]
        for i, n in zip(idx, got):
            norms[i] = n
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> tuple[AdamW, LambdaLR]:
    """AdamW over `params` (those that require grad) and its schedule."""
    params = [p for p in params if p.requires_grad]
    # foreach=False: the foreach kernels group tensors by device/dtype and DTensor mesh;
    # per-parameter updates keep CPU offload and mixed meshes simple. fused is CUDA-only.
    fused = all(p.device.type == "cuda" for p in params)
    opt = AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=fused or None, foreach=None if fused else False,
    )
    # the fused kernel writes the parameters without bumping their version counters, which
    # parallel/local.py reads to know when to refresh its compute-dtype copies: bump them
    opt.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(params))
    sched = LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched
