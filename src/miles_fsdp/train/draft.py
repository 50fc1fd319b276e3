"""Training the MTP draft (models/mtp.py) on the policy's own training forward.

The draft learns from the hidden states the trunk computed for the policy loss: no extra
trunk pass. Its loss reaches no trunk parameter (embedding and lm_head included): the hidden
states are detached here, and the model reads the shared embedding and lm_head detached.
So the policy's update is bitwise the same with the draft training or not
(tests/train/test_draft.py), and the draft has its own AdamW, schedule and gradient clipping.

Targets in a packed micro-batch (see packing.py: targets_T[i] = x_{s+1} at entry i = token s
of its sequence, mask_T[i] = x_{s+1} is trained). Module m at entry i (s >= 1):

    input   (H_{s-1} for m = 0, else G^{m-1}_s;  emb(x_{s+m}))   RoPE position s + m
    target  x_{s+m+1} = targets_T[i + m]
    counted s >= 1, s + m < L (same sequence), mask_T[i + m] and mask_T[i + m - 1]:
            x_{s+m} and x_{s+m+1} are both trained (response) tokens, never a prompt or
            tool token, never across a packed sequence boundary

The loss is `loss_coef * mean over modules of (NLL summed over counted entries / their count
in the global batch)`, so it does not depend on packing, accumulation or the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from miles_kernels.meta import host_to_device
from miles_fsdp.errors import UserError
from miles_fsdp.models import ModelArgs
from miles_fsdp.parallel.reduce import all_reduce_sum
from miles_fsdp.train.optim import OptimConfig, build_optimizer, clip_scale, grad_norm, skips_on_device
from miles_fsdp.train.packing import MicroBatch


class DraftConfigError(UserError, ValueError):
    """A draft setting the model or the run cannot honour."""


@dataclass
class DraftConfig:
    n_mtp: int = 0
    """MTP draft modules. 0 = the checkpoint's own (num_nextn_predict_layers in config.json;
    none if it has no draft). N > 0 on a checkpoint without draft weights builds a fresh draft
    of N modules (each a copy of its last decoder layer); on one with a draft, N must match."""
    enabled: bool | None = None
    """Train the draft beside the policy (on the same forward). Unset: sft, whenever the model
    has a draft; rl, when it has one and the engine speculates (engine.num_speculative_tokens > 0)."""
    frozen: bool = False
    """Keep the draft fixed: its loss and accuracy are still measured each step, for comparison."""
    loss_coef: float = 1.0
    """Factor on the draft's loss (mean token NLL per module, averaged over modules). The loss
    reaches the draft's parameters only, so this scales the draft's gradient, nothing else."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, grad_clip=1.0))
    """The draft's own AdamW and LR schedule; grad_clip clips the draft's gradient norm alone
    (the policy's clipping and its train/grad_norm never see the draft)."""

    def __post_init__(self):
        if self.n_mtp < 0:
            raise DraftConfigError(f"draft.n_mtp={self.n_mtp} (--draft.n-mtp): must be >= 0 (0 = the checkpoint's)")
        if not self.loss_coef > 0:
            raise DraftConfigError(f"draft.loss_coef={self.loss_coef} (--draft.loss-coef): must be > 0")

    def n_mtp_for(self, model_dir: str, fresh_default: int = 0) -> int:
        """Draft modules of the run's model (for models.load_model): n_mtp if set, else the
        checkpoint's, else `fresh_default` fresh ones (0: no draft)."""
        return self.n_mtp or ModelArgs.from_hf(model_dir).n_mtp or fresh_default

    def trains(self, model_n_mtp: int, default: bool) -> bool:
        """Whether a run with a model of `model_n_mtp` draft modules trains (or, frozen,
        measures) the draft: `enabled`, or `default` when unset; never without a draft."""
        if self.enabled and not model_n_mtp:
            raise DraftConfigError("draft.enabled=True (--draft.enabled) but the model has no draft: set "
                                   "--draft.n-mtp N to build one, or use a checkpoint with num_nextn_predict_layers")
        return bool(model_n_mtp) and (default if self.enabled is None else self.enabled)


def draft_stream(mb: MicroBatch, module: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_T, targets_T, counted_T) of draft module `module` on mb's entries (module docstring):
    the token each entry embeds, the token it predicts, and whether its loss counts (fp32 0/1).
    Past a sequence's end the token is 0 and nothing counts."""
    T, m = mb.num_tokens, module
    seg_T = torch.repeat_interleave(torch.arange(len(mb.cu_seqlens) - 1), torch.diff(mb.cu_seqlens.long()))
    end_T = mb.cu_seqlens.long()[1:][seg_T]  # one past the last entry of each entry's sequence
    j_T = torch.arange(T) + m
    inside_T = j_T < end_T
    j_T = torch.where(inside_T, j_T, torch.zeros_like(j_T))
    ids_T = torch.where(inside_T, mb.ids_T[j_T], torch.zeros_like(mb.ids_T))
    targets_T = torch.where(inside_T, mb.targets_T[j_T], torch.zeros_like(mb.targets_T))
    prev_mask_T = mb.mask_T[(j_T - 1).clamp(min=0)]
    counted_T = inside_T & (mb.pos_T >= 1) & (mb.mask_T[j_T] > 0) & (prev_mask_T > 0)
    return ids_T, targets_T, counted_T.float()


def shift_hidden(hidden_TD: torch.Tensor, pos_T: torch.Tensor) -> torch.Tensor:
    """H_{s-1} at entry s, 0 at each sequence's first entry; detached (no trunk gradient)."""
    h_TD = hidden_TD.detach()
    prev_TD = torch.cat([h_TD.new_zeros(1, h_TD.shape[1]), h_TD[:-1]])
    return torch.where((pos_T == 0)[:, None], torch.zeros_like(prev_TD), prev_TD)


class DraftTrainer:
    """The draft's part of a train step: its loss on the policy forward's hidden states
    (`loss`), then its own clip and AdamW step (`step`). With cfg.frozen the draft is only
    measured: no gradient, no optimizer."""

    def __init__(self, model: nn.Module, cfg: DraftConfig, group=None):
        self.cfg, self.group = cfg, group
        self.n_mtp = len(model.mtp)
        self.params = list(model.mtp.parameters())
        self.optimizer = self.scheduler = None
        if not cfg.frozen:
            self.optimizer, self.scheduler = build_optimizer(self.params, cfg.optim)
        self._denoms: list[float] = []
        self._sums: torch.Tensor | None = None

    def begin(self, micro_batches: list[MicroBatch]) -> None:
        """Count the entries each module's loss averages over, in the global batch (collective)."""
        counts = [sum(float(draft_stream(mb, m)[2].sum()) for mb in micro_batches if not mb.dummy)
                  for m in range(self.n_mtp)]
        self._denoms = all_reduce_sum(counts, self.group)
        self._sums = None

    def loss(self, model: nn.Module, hidden_TD: torch.Tensor, mb: MicroBatch, meta, slot_T) -> torch.Tensor:
        """The draft's loss term for this micro-batch, scaled for the global batch (add it to
        the policy's before backward; a dummy micro-batch gives a zero that still runs the
        draft's collectives). Accumulates draft/loss and draft/acc statistics."""
        dev = hidden_TD.device
        pos_T = host_to_device(mb.pos_T, dev)
        h_TD = shift_hidden(hidden_TD, pos_T)
        total = hidden_TD.new_zeros((), dtype=torch.float32)
        sums = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            for m in range(self.n_mtp):
                ids_T, targets_T, counted_T = (host_to_device(t, dev) for t in draft_stream(mb, m))
                logp_T, hit_T, h_TD = model.draft_token_logprobs(h_TD, ids_T, pos_T + m, meta, slot_T, targets_T, m)
                nll_sum = -(torch.where(counted_T > 0, logp_T, torch.zeros_like(logp_T)) * counted_T).sum()
                total = total + nll_sum / max(self._denoms[m], 1.0)
                sums += [nll_sum.detach(), (hit_T.float() * counted_T).sum()]
        s = torch.stack(sums)
        self._sums = s if self._sums is None else self._sums + s
        return total * (self.cfg.loss_coef / self.n_mtp)

    def zero_grad(self) -> None:
        """Drop the draft's gradients (a failed step's partial ones)."""
        for p in self.params:
            p.grad = None

    def step(self, grads: dict | None = None, shadows: dict | None = None) -> dict[str, torch.Tensor | float]:
        """Clip the draft's gradients (alone), step its AdamW and schedule; the step's metrics
        as on-device sums for the caller's all-reduce: `sums` (per module: NLL, hits) and `denoms`.
        grads ({param: grad} as the backward left them; the params' .grad unread) steps in one
        pass (AdamW.step_with: the clip and a non-finite norm's skip on the device), writing
        `shadows` too; None: torch's step from .grad."""
        out: dict = {"sums": self._sums, "denoms": self._denoms}
        if self.optimizer is None:
            out["lr"] = 0.0
            return out
        if grads is not None:
            norm = grad_norm(list(grads.values())) if grads else torch.zeros(())
            if grads:
                self.optimizer.step_with(grads, shadows, clip_scale(norm, self.cfg.optim.grad_clip),
                                         (~torch.isfinite(norm)).float())
        else:
            grads_ = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads_, norm_type=2.0) if grads_ else torch.zeros(())
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            if skips_on_device(self.optimizer, self.params):  # as the policy's: clip and skip inside fused AdamW, no host wait
                self.optimizer.grad_scale = clip_scale(norm, self.cfg.optim.grad_clip)
                self.optimizer.found_inf = (~torch.isfinite(norm)).float()
                try:
                    self.optimizer.step()
                finally:
                    self.optimizer.grad_scale = self.optimizer.found_inf = None
            else:
                if self.cfg.optim.grad_clip > 0 and grads_:
                    torch.nn.utils.clip_grads_with_norm_([p for p in self.params if p.grad is not None],
                                                         self.cfg.optim.grad_clip, norm)
                if bool(torch.isfinite(norm)):
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["grad_norm"] = norm  # a device scalar: read with the metrics, no host wait here
        self.scheduler.step()
        return out


def draft_metrics(sums: list[float], denoms: list[float], lr: float, grad_norm: float | None) -> dict[str, float]:
    """draft/loss (mean NLL, averaged over modules), draft/acc (share of counted entries where
    module 0's argmax is the target: a proxy of speculative acceptance), draft/lr; per module
    draft/loss_m{m}, draft/acc_m{m} when there are several."""
    n = len(denoms)
    loss_m = [sums[2 * m] / max(denoms[m], 1.0) for m in range(n)]
    acc_m = [sums[2 * m + 1] / max(denoms[m], 1.0) for m in range(n)]
    out = {"draft/loss": sum(loss_m) / n, "draft/acc": acc_m[0], "draft/lr": lr, "draft/tokens": denoms[0]}
    if grad_norm is not None:
        out["draft/grad_norm"] = grad_norm
    if n > 1:
        out.update({f"draft/loss_m{m}": loss_m[m] for m in range(n)})
        out.update({f"draft/acc_m{m}": acc_m[m] for m in range(n)})
    return out
